"""adapter_config.json values that would break serving are refused at push, in one line;
a compatibility check that meets something it cannot read refuses with the reason."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorabay.hub import Registry
from lorabay.hub.compat import check_manifest_against_base
from lorabay.hub.errors import IncompatibleBase, InvalidAdapter


def edited(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def refused(registry_url, tmp_path, folder, error=InvalidAdapter, **kwargs) -> str:
    with pytest.raises(error) as caught:
        Registry.open(registry_url).push(folder, "a", **kwargs)
    assert not (tmp_path / "registry").exists(), "a refused push wrote something"
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message
    return message


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"target_modules": "*"}, "target_modules '*' is not a valid regular expression"),
        ({"target_modules": "q_proj("}, "not a valid regular expression"),
        ({"target_modules": ["q_proj", 7]}, "target_modules holds 7"),
        ({"rank_pattern": {"q_proj(": 4}}, "rank_pattern key 'q_proj(' is not a valid regular"),
        ({"rank_pattern": {"q_proj": "four"}}, "rank_pattern['q_proj'] is 'four', not a whole"),
        ({"rank_pattern": {"q_proj": 0}}, "not a whole number from 1"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern is ['q_proj'], not an object"),
        ({"alpha_pattern": {"v_proj": "big"}}, "alpha_pattern['v_proj'] is 'big', not a finite"),
        ({"alpha_pattern": {"[": 8}}, "alpha_pattern key '[' is not a valid regular"),
        ({"lora_alpha": "eight"}, "lora_alpha is 'eight', not a finite number"),
        ({"r": 1 << 20}, "r is 1048576, not a whole number from 1 to 65536"),
        ({"r": True}, "r is True"),
        ({"modules_to_save": "score"}, "modules_to_save is 'score', not a list"),
    ],
)
def test_config_values_that_break_serving(registry_url, tmp_path, lora, changes, fragment):
    assert fragment in refused(registry_url, tmp_path, edited(lora(), **changes))


def test_every_problem_at_once(registry_url, tmp_path, lora):
    folder = edited(lora(), target_modules="*", rank_pattern={"q": "x"}, lora_alpha=None)
    message = refused(registry_url, tmp_path, folder)
    assert message.count(";") >= 2 and "target_modules" in message and "rank_pattern" in message


def test_lora_alpha_missing(registry_url, tmp_path, lora):
    folder = lora()
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert "lora_alpha is missing" in refused(registry_url, tmp_path, folder)


def test_nested_5000_deep(registry_url, tmp_path, lora):
    folder = lora()
    config = (folder / "adapter_config.json").read_text()
    deep = "[" * 5000 + "]" * 5000
    (folder / "adapter_config.json").write_text(config[:-1] + f', "extra": {deep}}}')
    assert "nests too deeply" in refused(registry_url, tmp_path, folder)


def test_nested_deeper_than_peft_writes(registry_url, tmp_path, lora):
    folder = lora()
    config = (folder / "adapter_config.json").read_text()
    deep = "[" * 100 + "]" * 100  # parses, but no PEFT config looks like this
    (folder / "adapter_config.json").write_text(config[:-1] + f', "extra": {deep}}}')
    assert "nests deeper than 32 levels" in refused(registry_url, tmp_path, folder)


def test_r_of_5000_digits(registry_url, tmp_path, lora):
    folder = lora()
    config = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(config.replace('"r": 4', '"r": ' + "7" * 5000))
    message = refused(registry_url, tmp_path, folder)
    assert "is not valid JSON" in message and "digits" in message


def test_a_huge_config_file(registry_url, tmp_path, lora):
    folder = edited(lora(), padding="x" * (2 << 20))
    assert "is over 1,048,576 bytes" in refused(registry_url, tmp_path, folder)


@pytest.mark.parametrize(
    "name", ["tokenizer\u202ejson.txt", "notes\x1b[2J.md", "a\u200bb.json", "line\u2028.txt"]
)
def test_file_names_with_control_or_bidi_characters(registry_url, tmp_path, lora, name):
    folder = lora()
    (folder / name).write_text("{}")
    message = refused(registry_url, tmp_path, folder)
    assert "control or formatting character" in message
    assert all(c not in message for c in "\u202e\x1b\u200b\u2028")  # escaped, not raw


def test_description_and_labels_with_control_characters(registry_url, tmp_path, lora):
    from lorabay.hub.errors import ConfigError

    message = refused(
        registry_url,
        tmp_path,
        lora(),
        error=ConfigError,
        description="fine\x1b]0;owned\x07",
        labels={"task": "x\u202ey"},
    )
    assert "description holds the control character U+001B" in message
    assert "label 'task' holds the control character U+202E" in message


def write_base(folder, index: str | None = None):
    """A base folder: config.json, and either weights or a (given) shard index."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "vocab_size": 2048,
    }
    (folder / "config.json").write_text(json.dumps(config))
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(index)
    else:
        weights = {
            f"model.layers.{i}.self_attn.{m}.weight": np.zeros((o, 256), np.float32)
            for i in range(2)
            for m, o in (("q_proj", 256), ("v_proj", 128))
        }
        save_file(weights, str(folder / "model.safetensors"))
    return folder


def test_a_check_that_raises_is_a_refusal_with_the_reason(registry_url, tmp_path, lora):
    base = write_base(tmp_path / "odd-base", index="{this is not json")
    message = refused(registry_url, tmp_path, lora(), error=IncompatibleBase, base=base)
    assert "could not be checked (JSONDecodeError" in message


def test_a_stored_manifest_from_before_the_rules_is_refused_not_a_500(registry_url, tmp_path, lora):
    """An adapter stored before its target_modules were checked: the gateway's check
    (the same function) refuses it with a reason instead of raising re.error."""
    import dataclasses

    reg = Registry.open(registry_url)
    manifest = reg.push(lora(), "a").manifest
    old = dataclasses.replace(manifest, peft={**manifest.peft, "target_modules": "*"})
    base = write_base(tmp_path / "base")
    reasons = check_manifest_against_base(old, reg.pull(manifest), base, None)
    assert reasons and "could not be checked (error" in reasons[0]
    assert check_manifest_against_base(manifest, reg.pull(manifest), base, None) == []
