"""Task config loading, task file collection and data file groups."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest

from glm.evaluation.config import (
    BaseConfig,
    ConfigError,
    GenerationTaskConfig,
    LanguageModelTaskConfig,
    MultiChoiceTaskConfig,
    TaskType,
    collect_task_files,
    config_from_dict,
    load_task_config,
    resolve_file_groups,
)


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> BaseConfig:
    return load_task_config(write(tmp_path / "task.yaml", text))


REQUIRED = "name: t\npath: p\n"

BASE_DEFAULTS = {
    "module": None,
    "use_task_mask": False,
    "use_multitask_encoding": False,
    "unidirectional": False,
    "max_seq_length": 2048,
    "file_pattern": "**/*.json*",
    "micro_batch_size": 1,
}


# ---------------------------------------------------------------- defaults (reference §4.2)


GENERATION_DEFAULTS = {
    "sampling_strategy": "BaseStrategy",
    "num_beams": 4,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 3,
    "min_gen_length": 0,
    "max_gen_length": 128,
}


@pytest.mark.parametrize(
    ("kind", "cls", "own_defaults"),
    [
        ("mul", MultiChoiceTaskConfig, {"metrics": ["Accuracy"]}),
        ("gen", GenerationTaskConfig, {"metrics": ["EM", "F1"], **GENERATION_DEFAULTS}),
        ("lm", LanguageModelTaskConfig, {"metrics": ["PPL"], "generation_length": 256}),
    ],
)
def test_defaults_per_type(tmp_path: Path, kind: str, cls: type, own_defaults: dict) -> None:
    config = load(tmp_path, REQUIRED + f"type: {kind}\n")
    assert type(config) is cls and config.type is TaskType(kind)
    assert asdict(config) == {
        "name": "t",
        "type": TaskType(kind),
        "path": "p",
        **BASE_DEFAULTS,
        **own_defaults,
    }


def test_type_other_uses_the_base_config(tmp_path: Path) -> None:
    config = load(tmp_path, REQUIRED + "type: other\nmodule: pkg.mod.Task\n")
    assert type(config) is BaseConfig and config.metrics == [] and config.module == "pkg.mod.Task"


def test_default_metric_lists_are_not_shared() -> None:
    a = config_from_dict({"name": "a", "type": "mul", "path": "p"})
    a.metrics.append("F1_mul")
    assert config_from_dict({"name": "b", "type": "mul", "path": "p"}).metrics == ["Accuracy"]


# ---------------------------------------------------------------- original task files (reference §4.11)

GLUE_COLA = """name: 'glue_cola'
type: 'mul'
path: 'bloom/glue_cola'
file-pattern:
  validation: "**/validation.jsonl"
micro-batch-size: 30
"""
LAMBADA = """name: "LAMBADA"
type: "gen"
module: "tasks.lambada.task.LAMBADA"
path: "lambada/lambada"
file-pattern:
  test: "**/test.jsonl"
  validation: "**/validation.jsonl"
sampling_strategy: "BeamSearchStrategy"
num_beams: 16
max_gen_length: 5
use_task_mask: true
unidirectional: true
"""
PILE = """name: "Pile"
type: "lm"
module: "tasks.language-modeling.pile.Pile"
path: "pile"
file-pattern:
  test: "**/test_tokenized.jsonl"
#  validation: "**/val_tokenized.jsonl"
generation-length: 1024
use_task_mask: true
"""
MNLI = """name: glue_mnli
type: mul
path: bloom/glue_mnli
file-pattern:
  validation-matched: "**/validation_matched.jsonl"
  validation-mismatched: "**/validation_mismatched.jsonl"
micro_batch_size: 8
"""


def test_kebab_and_snake_keys(tmp_path: Path) -> None:
    cola = load(tmp_path, GLUE_COLA)
    assert cola.file_pattern == {"validation": "**/validation.jsonl"} and cola.micro_batch_size == 30

    lambada = load(tmp_path, LAMBADA)
    assert isinstance(lambada, GenerationTaskConfig)
    assert (lambada.sampling_strategy, lambada.num_beams, lambada.max_gen_length) == (
        "BeamSearchStrategy",
        16,
        5,
    )
    assert lambada.use_task_mask and lambada.unidirectional and lambada.module == "tasks.lambada.task.LAMBADA"

    pile = load(tmp_path, PILE)
    assert isinstance(pile, LanguageModelTaskConfig) and pile.generation_length == 1024

    mnli = load(tmp_path, MNLI)  # group names keep their hyphens; only top-level keys are respelled
    assert list(mnli.file_pattern) == ["validation-matched", "validation-mismatched"]
    assert mnli.micro_batch_size == 8

    assert (
        load(tmp_path, REQUIRED + "type: gen\nmax-gen-length: 7\nno_repeat_ngram_size: 0\n").max_gen_length
        == 7
    )


def test_int_is_accepted_as_float(tmp_path: Path) -> None:
    config = load(tmp_path, REQUIRED + "type: gen\nlength_penalty: 2\n")
    assert config.length_penalty == 2.0 and isinstance(config.length_penalty, float)


# ---------------------------------------------------------------- errors


def test_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"task\.yaml: unknown key 'micro-bach-size' .*'micro-batch-size'\?"
    ):
        load(tmp_path, REQUIRED + "type: mul\nmicro-bach-size: 4\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'num_beam' for a 'gen' task; did you mean 'num_beams'\?"
    ):
        load(tmp_path, REQUIRED + "type: gen\nnum_beam: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'metrics'"):
        load(tmp_path, REQUIRED + "type: mul\nmetric: [Accuracy]\n")  # the docs' spelling
    with pytest.raises(ConfigError, match="unknown key 'num_beams' for a 'mul' task"):
        load(tmp_path, REQUIRED + "type: mul\nnum_beams: 4\n")


def test_both_spellings_of_one_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key 'micro_batch_size' repeats 'micro-batch-size'"):
        load(tmp_path, REQUIRED + "type: mul\nmicro-batch-size: 2\nmicro_batch_size: 3\n")


def test_missing_required_key_names_key_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.yaml: missing required key 'path'"):
        load(tmp_path, "name: t\ntype: mul\n")
    with pytest.raises(ConfigError, match=r"task\.yaml: missing required key 'type'"):
        load(tmp_path, REQUIRED)


def test_wrong_type_names_key_type_and_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"task\.yaml: key 'max-seq-length' expects int, got str \('2048'\)"
    ):
        load(tmp_path, REQUIRED + "type: mul\nmax-seq-length: '2048'\n")
    with pytest.raises(ConfigError, match="key 'use_task_mask' expects bool, got int"):
        load(tmp_path, REQUIRED + "type: mul\nuse_task_mask: 1\n")
    with pytest.raises(ConfigError, match=r"key 'file_pattern' expects str or dict\[str, str\], got list"):
        load(tmp_path, REQUIRED + "type: mul\nfile_pattern: ['*.jsonl']\n")
    with pytest.raises(ConfigError, match=r"key 'metrics' expects list\[str\], got str"):
        load(tmp_path, REQUIRED + "type: mul\nmetrics: Accuracy\n")
    with pytest.raises(ConfigError, match="key 'module' expects str or null, got int"):
        load(tmp_path, REQUIRED + "type: mul\nmodule: 3\n")


def test_type_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'type' is 'mult'; did you mean 'mul'\?"):
        load(tmp_path, REQUIRED + "type: mult\n")
    with pytest.raises(ConfigError, match="type 'other' has no default task class"):
        load(tmp_path, REQUIRED + "type: other\n")


def test_value_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.yaml: \[MASK\] doesn't support unidirectional attention"):
        load(tmp_path, REQUIRED + "type: mul\nunidirectional: true\n")
    with pytest.raises(
        ConfigError, match="unknown sampling_strategy 'BeamSearch'; did you mean 'BeamSearchStrategy'"
    ):
        load(tmp_path, REQUIRED + "type: gen\nsampling_strategy: BeamSearch\n")
    with pytest.raises(ConfigError, match="file_pattern has no groups"):
        load(tmp_path, REQUIRED + "type: mul\nfile_pattern: {}\n")
    with pytest.raises(ConfigError, match="micro_batch_size must be at least 1"):
        load(tmp_path, REQUIRED + "type: mul\nmicro_batch_size: 0\n")


def test_unknown_metric(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"task\.yaml: unknown metric 'accuracy'; did you mean 'Accuracy'\?"
    ):
        load(tmp_path, REQUIRED + "type: mul\nmetrics: [accuracy]\n")
    # A custom module may register its metric when imported, so the name is checked later.
    assert load(tmp_path, REQUIRED + "type: mul\nmodule: a.B\nmetrics: [CP]\n").metrics == ["CP"]


def test_malformed_yaml_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, REQUIRED + "type: mul\nfile_pattern: [unclosed\n")
    message = str(error.value)
    assert (
        "\n" not in message
        and message.startswith(f"{tmp_path / 'task.yaml'}:")
        and "malformed YAML" in message
    )
    with pytest.raises(ConfigError, match=r"task\.yaml:3:\d+: malformed YAML"):
        load(tmp_path, "name: t\npath: p\n  type: mul\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys, got NoneType"):
        load(tmp_path, "# only a comment\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys, got list"):
        load(tmp_path, "- name: t\n")


# ---------------------------------------------------------------- task files


def test_collect_task_files_recursive_and_sorted(tmp_path: Path) -> None:
    root = tmp_path / "tasks"
    for name in [
        "b.yaml",
        "a.yml",
        "sub/z.yaml",
        "sub/deeper/c.yaml",
        "notes.txt",
        ".hidden/d.yaml",
        "sub/.e.yaml",
    ]:
        write(root / name)
    single = write(tmp_path / "extra.yaml")
    found = collect_task_files([str(single), str(root), str(root / "b.yaml")])
    assert found == [single] + [root / p for p in ["a.yml", "b.yaml", "sub/deeper/c.yaml", "sub/z.yaml"]]


def test_collect_task_files_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"task config path '.*nope\.yaml' does not exist"):
        collect_task_files([str(tmp_path / "nope.yaml")])


# ---------------------------------------------------------------- data file groups


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    for name in [
        "bloom/glue_mnli/prompt_b/validation_matched.jsonl",
        "bloom/glue_mnli/prompt_a/validation_matched.jsonl",
        "bloom/glue_mnli/prompt_a/validation_mismatched.jsonl",
        "bloom/glue_mnli/prompt_a/deeper/validation_matched.jsonl",
        "bloom/glue_mnli/readme.txt",
    ]:
        write(tmp_path / name, "{}\n")
    (tmp_path / "bloom/glue_mnli/dir.jsonl").mkdir()  # a folder the default pattern matches is skipped
    return tmp_path


def test_file_groups_from_a_dict(tmp_path: Path, data_root: Path) -> None:
    groups = resolve_file_groups(load(tmp_path, MNLI), data_root)
    folder = data_root / "bloom/glue_mnli"
    assert groups == {
        "validation-matched": [
            folder / "prompt_a/deeper/validation_matched.jsonl",
            folder / "prompt_a/validation_matched.jsonl",
            folder / "prompt_b/validation_matched.jsonl",
        ],
        "validation-mismatched": [folder / "prompt_a/validation_mismatched.jsonl"],
    }


def test_file_pattern_string_is_group_all(data_root: Path) -> None:
    config = config_from_dict({"name": "t", "type": "mul", "path": "bloom/glue_mnli"})
    groups = resolve_file_groups(config, data_root)
    assert list(groups) == ["all"] and len(groups["all"]) == 4


def test_pattern_without_match_names_pattern_and_folder(data_root: Path) -> None:
    config = config_from_dict(
        {"name": "t", "type": "mul", "path": "bloom/glue_mnli", "file-pattern": {"test": "**/test.jsonl"}}
    )
    folder = data_root / "bloom/glue_mnli"
    with pytest.raises(
        FileNotFoundError,
        match=rf"file pattern '\*\*/test\.jsonl' .*matched no file in {re.escape(str(folder))}",
    ):
        resolve_file_groups(config, data_root)
    with pytest.raises(FileNotFoundError, match=r"data folder .* does not exist"):
        resolve_file_groups(config_from_dict({"name": "t", "type": "mul", "path": "missing"}), data_root)
