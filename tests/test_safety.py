"""Safety: weights only as safetensors, nothing unpickled, no secret in a saved config.

(That no API key or token reaches a run's files or logs is checked end to end in test_ddp.py.)
"""

from __future__ import annotations

import ast

from omegaconf import open_dict

from personalize.config import PROJECT_ROOT
from personalize.tracking import redact, resolved_config


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_the_package_never_unpickles_or_pickles_weights():
    problems = []
    for path in sorted((PROJECT_ROOT / "personalize").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(PROJECT_ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                    problems.append(f"{where}:{node.lineno} imports a pickler")
        for node, func in calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func.endswith("torch.load") and keywords.get("weights_only") != "True":
                problems.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            if func.endswith("torch.save"):
                problems.append(f"{where}:{node.lineno} torch.save (write safetensors)")
            if keywords.get("safe_serialization") == "False":
                problems.append(f"{where}:{node.lineno} safe_serialization=False")
    assert not problems, "\n".join(problems)


def test_redact_hides_secret_values_and_keeps_our_own_words():
    config = {
        "logger": {"api_key": "abc", "wandb_token": "t0k", "project": "personalize"},
        "hub": {"HF_TOKEN": "hf_x", "password": "pw", "client_secret": "s"},
        "method": {"identifier": "<sks>", "new_token": {"initializer": "dog"}},
        "runs": [{"auth_token": "in-a-list"}],
        "max_token_length": 77,  # not a string: a number cannot be a credential
    }
    clean = redact(config)
    assert clean["logger"] == {"api_key": "<redacted>", "wandb_token": "<redacted>", "project": "personalize"}
    assert set(clean["hub"].values()) == {"<redacted>"}
    assert clean["method"] == config["method"] and clean["runs"] == [{"auth_token": "<redacted>"}]
    assert clean["max_token_length"] == 77
    assert config["logger"]["api_key"] == "abc"  # a copy: the live config is untouched


def test_saved_config_carries_no_secret(make_cfg):
    cfg = make_cfg("method=two_stage")
    with open_dict(cfg):  # e.g. a key a user put in conf/local/default.yaml
        cfg.logger.api_key = "wandb-0123456789"
    saved = resolved_config(cfg)
    assert saved["logger"]["api_key"] == "<redacted>" and "wandb-0123456789" not in str(saved)
    assert saved["method"]["identifier"] == "<rare>"
