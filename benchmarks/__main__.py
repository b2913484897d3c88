from personalize.bench.run import main

main()
