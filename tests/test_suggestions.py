"""Every fix a `check` message proposes is applied mechanically and the result passes `check`: over bad configs
generated from the schema itself (a near miss of every Literal field, every key misplaced into another section or
the top level, words where numbers go, empty values, sizes written as one string) and over `--set` mistakes (typos,
the wrong section, negative, missing and out-of-range indices)."""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import tomli_w

from trainer.config.messages import config_sections
from trainer.preflight.check import check_config_file

SOURCE = "c.toml"
# values the schema takes but this CPU machine can't run: the fix is right, the machine refuses it
MACHINE_REFUSES = {("optim", "optimizer", "adamw8bit"), ("tracking", "report_to", "wandb"),
                   ("tracking", "report_to", "tensorboard")}


def base(data: Path, out: Path) -> dict:
    return {
        "model": {"flavour": "tiny"},
        "datasets": [{"path": str(data), "num_frames": 9, "width": 64, "height": 64}],
        "train": {"output_dir": str(out), "max_train_steps": 2},
        "optim": {"lr_warmup_steps": 0},
        "validation": {"num_inference_steps": 2},
    }


def _drop_none(data):
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return [_drop_none(v) for v in data] if isinstance(data, list) else data


def check(tmp_path: Path, raw: dict, sets: list[str] = (), scan: bool = False) -> list[str]:
    """The error lines of `wanforge check` for this config (the dataset scan off unless asked: it is the same for
    every case here and is tested elsewhere)."""
    path = tmp_path / SOURCE
    path.write_text(tomli_w.dumps(_drop_none(raw)), encoding="utf-8")
    return [line.replace(str(path), SOURCE) for line in check_config_file(path, list(sets), scan=scan).errors]


# ---------------------------------------------------------------- applying a fix, as a user pasting it would

_VALUE = r'"[^"]*"|\[[^\]]*\]|-?[0-9][0-9.e+-]*|true|false'
_ASSIGN = re.compile(rf"(?P<path>[a-z_]+(?:\[\d+\])?(?:\.[a-z_0-9]+)*) = (?P<value>{_VALUE})")


def _path(text: str) -> list[str | int]:
    """"datasets[0].width" -> ["datasets", 0, "width"]."""
    out: list[str | int] = []
    for part in text.split("."):
        m = re.fullmatch(r"([a-z_]+)\[(\d+)\]", part)
        out += [m.group(1), int(m.group(2))] if m else [int(part) if part.isdigit() else part]
    return out


def _get(raw: Any, path: list) -> Any:
    for p in path:
        raw = raw[p]
    return raw


def _set(raw: dict, path: list, value: Any) -> None:
    node = raw
    for p in path[:-1]:
        node = node.setdefault(p, {}) if isinstance(node, dict) else node[p]
    node[path[-1]] = value


def _delete(raw: dict, path: list) -> None:
    _get(raw, path[:-1]).pop(path[-1], None)


def _value(text: str) -> Any:
    return tomllib.loads(f"v = {text}")["v"]


def apply_fix(raw: dict, sets: list[str], line: str) -> tuple[dict, list[str]]:
    """The config after doing what the error line says, parsed from the line alone."""
    if line.startswith("--set "):
        original = re.match(r'--set "([^"]*)"', line).group(1)
        proposed = re.findall(r"--set ([^ =()]+=[^ ()]+)", line.split(": ", 1)[1])
        assert proposed, f"no --set to apply in {line!r}"
        return raw, [s for s in sets if s != original] + [proposed[-1]]
    m = re.match(rf"(?:{re.escape(SOURCE)}: )?(?:unknown key )?(?P<where>[a-z_0-9\[\].]+?)(?: =|:| is a section) "
                 r"(?P<rest>.*)$", line)
    assert m, f"no field named in {line!r}"
    where, rest = _path(m.group("where")), m.group("rest")
    table = where[:-1]
    if line.startswith(f"{SOURCE}: unknown key ") or " is a section (a table)" in line:
        value = _get(raw, where)
        home = re.search(r"it belongs in (\[\[?)([a-z_]+)\]\]? as ([a-z_0-9]+)", rest)
        renamed = re.search(r'did you mean "([a-z_0-9]+)"\?', rest)
        _delete(raw, where)
        if home:
            target = [home.group(2), 0, home.group(3)] if home.group(1) == "[[" else [home.group(2), home.group(3)]
            _set(raw, target, value)
        elif renamed:
            _set(raw, [*table, renamed.group(1)], value)
        else:
            assert "remove it" in rest, f"unknown fix in {line!r}"
        return raw, sets
    if "remove the key" in rest and not _ASSIGN.search(rest.split(": ", 1)[-1]):
        _delete(raw, where)
        return raw, sets
    default = re.search(rf"try the default, ({_VALUE})", rest)
    literal = re.search(r'did you mean "([^"]+)"\?', rest)
    if default or literal:
        _set(raw, where, _value(default.group(1)) if default else literal.group(1))
        return raw, sets
    fix = rest.split(": ", 1)[-1] if ": " in rest else rest
    assignments = _ASSIGN.findall(re.split(r",? or ", fix)[0])  # the first of the alternatives a line offers
    tried = re.search(rf": try ({_VALUE})$", rest)
    if not assignments and tried:
        _set(raw, where, _value(tried.group(1)))
        return raw, sets
    assert assignments, f"no fix to apply in {line!r}"
    for path, value in assignments:
        full = _path(path)
        _set(raw, full if len(full) > 1 else [*table, *full], _value(value))
    if "remove resolution" in rest:
        _delete(raw, [*table, "resolution"])
    return raw, sets


def assert_fix_passes(tmp_path: Path, raw: dict, sets: list[str] = (), refused_here: bool = False,
                      expect: str | None = None) -> None:
    sets = list(sets)
    errors = check(tmp_path, raw, sets)
    assert errors, "the mistake was not refused"
    line = errors[0] if expect is None else next((e for e in errors if expect in e), None)
    assert line is not None, errors
    fixed_raw, fixed_sets = apply_fix(raw, sets, line)
    after = check(tmp_path, fixed_raw, fixed_sets)
    if refused_here:
        assert line not in after, after
    else:
        assert after == [], f"the fix of {line!r} is refused: {after}"


# ---------------------------------------------------------------- the cases, generated from the schema


def _literal_choices(annotation) -> tuple[str, ...]:
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is Literal:
            return typing.get_args(a)
    return ()


def _plain_default(field) -> Any:
    """A field's default as TOML writes it, or None when it has none worth moving (unset, a table)."""
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or (isinstance(value, list) and all(isinstance(v, str) for v in value)
                                                      and value):
        return value
    return None


LITERALS = [(s, f, c) for s, model, _ in config_sections() for f, info in model.model_fields.items()
            for c in _literal_choices(info.annotation) if c not in ("none",)]


@pytest.mark.parametrize("section, field, choice", LITERALS, ids=[f"{s}.{f}={c}" for s, f, c in LITERALS])
def test_a_near_miss_of_every_choice_is_fixed(section, field, choice, few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    where = ["datasets", 0, field] if section == "datasets" else [section, field]
    _set(raw, where, choice.upper() + "x" if len(choice) <= 3 else choice[:-1] + choice[-1].upper() + "x")
    if (section, field, choice) == ("lora", "lora_type", "lycoris"):
        (tmp_path / "ly.json").write_text('{"algo": "lokr"}')
        _set(raw, ["lora", "lycoris_config"], str(tmp_path / "ly.json"))
    needs_more = {("lora", "lora_type"), ("datasets", "caption_strategy"),  # the right value, which asks for more
                  ("datasets", "control_pairing")}
    refused = (section, field, choice) in MACHINE_REFUSES or (section, field) in needs_more
    assert_fix_passes(tmp_path, raw, refused_here=refused, expect=".".join(str(p) for p in where).replace(".0.", "[0]."))


def _misplacements() -> list[tuple[str, str, Any, str]]:
    """(section, field, its default, where it is put instead): every key of every section into the next section
    that lacks it, and every third one to the top level and into the dataset table."""
    sections = config_sections()
    names = [s for s, _, _ in sections]
    cases = []
    for n, (section, model, _) in enumerate(sections):
        for k, (field, info) in enumerate(model.model_fields.items()):
            value = _plain_default(info)
            if value is None or field == "flavour":
                continue
            others = [names[(n + j) % len(names)] for j in range(1, len(names))]
            target = next(t for t in others if field not in dict((s, m) for s, m, _ in sections)[t].model_fields)
            cases.append((section, field, value, target))
            if k % 3 == 0:
                cases.append((section, field, value, ""))
                if section != "datasets":
                    cases.append((section, field, value, "datasets"))
    return cases


MISPLACED = _misplacements()


@pytest.mark.parametrize("section, field, value, target", MISPLACED,
                         ids=[f"{s}.{f}->{t or 'top'}" for s, f, _, t in MISPLACED])
def test_a_misplaced_key_is_sent_where_it_belongs(section, field, value, target, few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    if target == "":
        raw[field] = value
    elif target == "datasets":
        raw["datasets"][0][field] = value
    else:
        raw.setdefault(target, {})[field] = value
    assert_fix_passes(tmp_path, raw)


NUMBERS = [(s, f) for s, model, _ in config_sections() for f, info in model.model_fields.items()
           if isinstance(_plain_default(info), (int, float)) and not isinstance(_plain_default(info), bool)]


@pytest.mark.parametrize("section, field", NUMBERS, ids=[f"{s}.{f}" for s, f in NUMBERS])
def test_a_word_where_a_number_goes_gets_a_number(section, field, few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    _set(raw, ["datasets", 0, field] if section == "datasets" else [section, field], "many")
    assert_fix_passes(tmp_path, raw)


STRINGS = [(s, f) for s, model, _ in config_sections() for f, info in model.model_fields.items()
           if str in (info.annotation, *typing.get_args(info.annotation)) or info.annotation is Path
           or Path in typing.get_args(info.annotation)]


@pytest.mark.parametrize("section, field", STRINGS, ids=[f"{s}.{f}" for s, f in STRINGS])
def test_an_empty_value_is_refused_with_a_fix(section, field, few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    where = ["datasets", 0, field] if section == "datasets" else [section, field]
    _set(raw, where, "")
    errors = check(tmp_path, raw)
    if field in ("negative_prompt", "pretrained_transformer_subfolder"):  # "" means something there
        assert not any(".".join(map(str, where)) in e for e in errors), errors
        return
    if field == "path":  # required: no value to propose, only what to give
        assert any("datasets[0].path: is empty: give the folder" in e for e in errors), errors
        return
    assert_fix_passes(tmp_path, raw)


def test_an_empty_list_of_modules_is_refused(few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    raw["lora"] = {"target_modules": []}
    assert "nothing would train" in check(tmp_path, raw)[0]
    assert_fix_passes(tmp_path, raw)
    raw["lora"] = {"target_modules": ["attn1.to_q", " "]}
    assert_fix_passes(tmp_path, raw)


@pytest.mark.parametrize("table, key, value, expected", [
    ("datasets", "resolution", "1280x720", (1280, 720)),
    ("datasets", "width", "1280x720", (1280, 720)),
    ("datasets", "height", "720 x 1280", (720, 1280)),
    ("datasets", "resolution", "1000*700", (992, 704)),
    ("datasets", "resolution", [832, 480], (832, 480)),
    ("datasets", "resolution", "480p", None),
    ("validation", "width", "128x64", (128, 64)),
    ("datasets", "minimum_image_size", "320x180", None),
], ids=["resolution", "width", "height", "rounded", "list", "480p", "validation", "minimum-size"])
def test_a_size_written_as_a_string_gets_two_numbers(table, key, value, expected, few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    raw["model"]["flavour"] = "t2v-480p-1.3b-2.1"  # a real Wan: 1280x720 is within its positions (the tiny one's 512)
    if key == "resolution":
        del raw["datasets"][0]["width"], raw["datasets"][0]["height"]
    _set(raw, ["datasets", 0, key] if table == "datasets" else [table, key], value)
    errors = check(tmp_path, raw)
    assert len(errors) == 1 and "unable to parse" not in errors[0] and "Input should be" not in errors[0], errors
    if expected is not None:
        assert f"width = {expected[0]}" in errors[0] and f"height = {expected[1]}" in errors[0], errors
    assert_fix_passes(tmp_path, raw)


def test_a_size_string_is_rounded_to_the_flavours_multiple(few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    raw["model"]["flavour"] = "tiny-ti2v"  # the Wan 2.2 VAE: multiples of 32
    raw["datasets"][0]["width"] = "500x300"
    assert "width = 512 and height = 288" in check(tmp_path, raw)[0]
    assert_fix_passes(tmp_path, raw)


SET_MISTAKES = [
    "train.max_train_stps=3", "trian.seed=1", "optim.seed=7", "train.learning_rate=0.0002", "learning_rate=0.0002",
    "datasets.-1.num_frames=5", "datasets[-1].num_frames=5", "datasets.3.num_frames=5", "datasets.num_frames=5",
    "datasets.0.learning_rate=0.0002", "train.max_train_steps.x=3", "lora.rnk=8", "validation.every_n_step=1",
    "checkpoint.every_n_step=5", "datasets[0].repeat=2", "datasets.-2.repeats=2",
]


@pytest.mark.parametrize("mistake", SET_MISTAKES)
def test_a_set_mistake_names_a_set_that_applies(mistake, few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    assert_fix_passes(tmp_path, raw, [mistake])


def test_the_fp8_message_proposes_a_lora_type_the_schema_has(few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    (tmp_path / "ly.json").write_text('{"algo": "lokr"}')
    raw["lora"] = {"lora_type": "lycoris", "lycoris_config": str(tmp_path / "ly.json")}
    raw["memory"] = {"base_quantization": "fp8"}
    assert_fix_passes(tmp_path, raw, expect="fp8")


@pytest.mark.parametrize("key, value, fix_in", [
    ("caption_extension", ".", '".txt"'), ("caption_extension", "txt/", '".txt"'),
    ("caption_extension", "caption", '".caption"'),
])
def test_check_level_fixes_apply(key, value, fix_in, few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    raw["datasets"][0][key] = value
    errors = check(tmp_path, raw)
    assert any(fix_in in e for e in errors), errors
    assert_fix_passes(tmp_path, raw)


@pytest.mark.parametrize("where, context, refused_here", [
    (["datasets", 0, "instance_prompt"], {("datasets", 0, "caption_strategy"): "instanceprompt"}, False),
    (["validation", "instance_prompt"], {("validation", "prompt"): "a <token> ball"}, False),
    (["hub", "hub_model_id"], {("hub", "push_to_hub"): True}, True),  # no Hub token here: refused for that alone
], ids=["instance-prompt", "validation-trigger", "hub-repo"])
def test_an_empty_value_another_setting_needs_asks_for_one(where, context, refused_here, few_clips, tmp_path):
    raw = base(few_clips, tmp_path / "run")
    for path, value in context.items():
        _set(raw, list(path), value)
    _set(raw, where, "")
    errors = check(tmp_path, raw)
    assert len(errors) == 1 and "is empty, and" in errors[0], errors
    assert_fix_passes(tmp_path, raw, refused_here=refused_here)
