"""The original GLM-130B evaluator's 37 task configs under `tasks/` (all but `tasks/offline/`) load with our
schema, and a handful of fields per type match the original (reference §4.11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glm.evaluation.config import (
    BaseConfig,
    GenerationTaskConfig,
    LanguageModelTaskConfig,
    TaskType,
    collect_task_files,
    load_task_config,
)
from glm.evaluation.tasks import MultiChoiceTask, task_class

TASKS = Path(__file__).resolve().parent.parent / "tasks"
OFFLINE = TASKS / "offline"
FINETUNE = TASKS / "finetune"  # the fine-tuning evidence task (tools/build_finetune_task.py), not an original


def _original_files() -> list[Path]:
    return [
        p for p in collect_task_files([str(TASKS)]) if OFFLINE not in p.parents and FINETUNE not in p.parents
    ]


@pytest.fixture(scope="module")
def configs() -> dict[str, BaseConfig]:
    """Relative path (e.g. "bloom/glue_cola.yaml") -> config."""
    return {p.relative_to(TASKS).as_posix(): load_task_config(p) for p in _original_files()}


def test_exactly_37_configs_with_unique_names(configs: dict[str, BaseConfig]) -> None:
    assert len(configs) == 37
    names = [c.name for c in configs.values()]
    assert len(set(names)) == len(names)


def test_folder_layout(configs: dict[str, BaseConfig]) -> None:
    folders = {}
    for rel in configs:
        folder = rel.rsplit("/", 1)[0]
        folders[folder] = folders.get(folder, 0) + 1
    assert folders == {
        "bloom": 10,
        "chinese/clue": 8,
        "chinese/fewclue": 6,
        "ethnic/crows-pair": 1,
        "ethnic/ethos": 4,
        "ethnic/stereoset": 1,
        "lambada": 2,
        "language-modeling": 4,
        "mmlu": 1,
    }


def test_types(configs: dict[str, BaseConfig]) -> None:
    gen = {name for name, c in configs.items() if c.type is TaskType.GENERATION}
    lm = {name for name, c in configs.items() if c.type is TaskType.LANGUAGE_MODEL}
    assert gen == {
        "bloom/mc_taco.yaml",
        "chinese/clue/cmrc2018.yaml",
        "chinese/clue/drcd.yaml",
        "lambada/lambada.yaml",
        "lambada/lambada-unidirectional.yaml",
    }
    assert lm == {f"language-modeling/{n}.yaml" for n in ("pile", "ptb", "wikitext-103", "wikitext-2")}
    assert all(c.type is TaskType.MULTICHOICE for n, c in configs.items() if n not in gen | lm)


def test_bloom(configs: dict[str, BaseConfig]) -> None:
    cola = configs["bloom/glue_cola.yaml"]
    assert (cola.name, cola.path, cola.micro_batch_size) == ("glue_cola", "bloom/glue_cola", 30)
    assert cola.file_pattern == {"validation": "**/validation.jsonl"}
    mnli = configs["bloom/glue_mnli.yaml"]
    assert mnli.file_pattern == {
        "validation-matched": "**/validation_matched.jsonl",
        "validation-mismatched": "**/validation_mismatched.jsonl",
    }
    assert mnli.micro_batch_size == 8
    assert configs["bloom/openbook_qa.yaml"].path == "bloom/openbookqa_main"
    assert configs["bloom/pubmed_qa.yaml"].file_pattern == {"train": "**/train.jsonl"}
    taco = configs["bloom/mc_taco.yaml"]
    assert isinstance(taco, GenerationTaskConfig)
    assert taco.file_pattern == {"validation": "**/validation_pp.jsonl", "test": "**/test_pp.jsonl"}
    assert (taco.micro_batch_size, taco.metrics) == (1, ["EM", "F1"])


def test_chinese(configs: dict[str, BaseConfig]) -> None:
    for rel, config in configs.items():
        if rel.startswith("chinese/clue/"):
            assert config.file_pattern == "**/*.json*"  # the default: one group "all"
            assert config.path.startswith("CLUE/")
        elif rel.startswith("chinese/fewclue/"):
            assert config.file_pattern == {"dev": "**/dev_few_all.jsonl", "test": "**/test_public.jsonl"}
    ocnli = configs["chinese/clue/ocnli.yaml"]
    assert (ocnli.name, ocnli.path, ocnli.micro_batch_size) == ("OCNLI_50K", "CLUE/ocnli", 24)
    chidf = configs["chinese/fewclue/chidf.yaml"]
    assert (chidf.name, chidf.path, chidf.micro_batch_size) == ("CHIDF", "CLUE/chid-fc", 16)
    assert configs["chinese/fewclue/bustm.yaml"].micro_batch_size == 56


def test_ethnic(configs: dict[str, BaseConfig]) -> None:
    crows = configs["ethnic/crows-pair/crows-pair.yaml"]
    assert crows.module == "tasks.ethnic.crows-pair.tasks.CrowsPairTask"
    assert crows.file_pattern == {"test": "**/crows-pair-dataset.jsonl"}
    stereo = configs["ethnic/stereoset/stereoset.yaml"]
    assert stereo.module == "tasks.ethnic.stereoset.tasks.StereoSetTask"
    assert stereo.use_task_mask and stereo.micro_batch_size == 64
    zero = configs["ethnic/ethos/ethos-zeroshot.yaml"]
    assert (zero.name, zero.micro_batch_size) == ("ETHOS_zeroshot", 128)
    assert all(c.path == "data" for rel, c in configs.items() if rel.startswith("ethnic/"))


def test_lambada(configs: dict[str, BaseConfig]) -> None:
    bi, uni = configs["lambada/lambada.yaml"], configs["lambada/lambada-unidirectional.yaml"]
    for config in (bi, uni):
        assert isinstance(config, GenerationTaskConfig)
        assert config.module == "tasks.lambada.task.LAMBADA"
        assert config.path == "lambada/lambada"
        assert config.file_pattern == {"test": "**/test.jsonl", "validation": "**/validation.jsonl"}
        assert (config.sampling_strategy, config.num_beams, config.max_gen_length) == (
            "BeamSearchStrategy",
            16,
            5,
        )
        assert config.use_task_mask
    assert (bi.name, bi.unidirectional) == ("LAMBADA", False)
    assert (uni.name, uni.unidirectional) == ("LAMBADA-unidirectional", True)


def test_language_modeling(configs: dict[str, BaseConfig]) -> None:
    pile = configs["language-modeling/pile.yaml"]
    assert isinstance(pile, LanguageModelTaskConfig)
    assert (pile.module, pile.path) == ("tasks.language-modeling.pile.Pile", "pile")
    assert pile.file_pattern == {"test": "**/test_tokenized.jsonl"}  # validation is commented out
    assert pile.generation_length == 1024
    ptb = configs["language-modeling/ptb.yaml"]
    assert (ptb.name, ptb.path) == ("Penn Treebank", "ptbdataset")
    assert ptb.file_pattern == {"test": "**/ptb.test.txt"}
    for rel, config in configs.items():
        if rel.startswith("language-modeling/"):
            assert config.use_task_mask and config.metrics == ["PPL"]
            if rel != "language-modeling/pile.yaml":
                assert config.generation_length == 256


def test_mmlu(configs: dict[str, BaseConfig]) -> None:
    mmlu = configs["mmlu/mmlu.yaml"]
    assert (mmlu.name, mmlu.path, mmlu.module) == ("MMLU", "MMLU", "tasks.mmlu.task.MMLU")
    assert mmlu.file_pattern == {
        "stem": "stem/*.json",
        "social_sciences": "social_sciences/*.json",
        "humanities": "humanities/*.json",
        "other": "other/*.json",
    }
    assert mmlu.micro_batch_size == 1


def test_mmlu_module_reports_overall(
    configs: dict[str, BaseConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    cls = task_class(configs["mmlu/mmlu.yaml"])
    assert issubclass(cls, MultiChoiceTask)
    task = cls.__new__(cls)  # the report needs no model
    task.report_overall_metrics(
        {"stem/a.json": ({"Accuracy": 50.0}, 2), "other/b.json": ({"Accuracy": 100.0}, 6)}
    )
    out = capsys.readouterr().out
    assert out.startswith("Group Overall Accuracy: ")
    assert "87.5" in out  # weighted average: (50 * 2 + 100 * 6) / 8


def test_modules_exist_or_are_listed_to_port(configs: dict[str, BaseConfig]) -> None:
    """A `module:` either names a file in this project or is listed in tasks/README.md as still to port."""
    readme = (TASKS / "README.md").read_text(encoding="utf-8")
    root = TASKS.parent
    for config in configs.values():
        if config.module:
            module_path = root / (config.module.rpartition(".")[0].replace(".", "/") + ".py")
            assert module_path.is_file() or f"`{config.module}`" in readme, config.module


def test_stereoset_module(configs: dict[str, BaseConfig], capsys: pytest.CaptureFixture[str]) -> None:
    cls = task_class(configs["ethnic/stereoset/stereoset.yaml"])
    assert issubclass(cls, MultiChoiceTask)
    metric = cls.__new__(cls).metrics["SS_ICAT"]
    kinds = ["stereotype", "anti-stereotype", "unrelated"]
    examples = [{"bias_type": "race", "goal_label": kinds}] * 4 + [
        {"bias_type": "gender", "goal_label": kinds}
    ]
    result = metric([0, 0, 1, 2, 0], examples)
    assert result["LMS race"] == 75.0
    assert result["SS race"] == pytest.approx(200 / 3)
    assert result["ICAT race"] == pytest.approx(75 * (100 / 3) / 50)
    assert (result["LMS gender"], result["SS gender"], result["ICAT gender"]) == (100.0, 100.0, 0.0)
    assert result["LMS overall"] == 80.0
    assert metric([2], [{"bias_type": "race", "goal_label": kinds}])["SS race"] == 0.0
    cls.__new__(cls).report_group_metrics("test", {"a.jsonl": (result, 5)})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "LMS" and out[1] == "cat:race        score:75.0"


def test_crows_pair_module(configs: dict[str, BaseConfig], capsys: pytest.CaptureFixture[str]) -> None:
    cls = task_class(configs["ethnic/crows-pair/crows-pair.yaml"])
    assert issubclass(cls, MultiChoiceTask)
    metric = cls.__new__(cls).metrics["CP"]
    examples = [
        {"pair_ID": 1, "sent_ID": 1, "bias_type": "race"},
        {"pair_ID": 1, "sent_ID": 2, "bias_type": "race"},
        {"pair_ID": 2, "sent_ID": 1, "bias_type": "race"},
        {"pair_ID": 2, "sent_ID": 2, "bias_type": "race"},
        {"pair_ID": 3, "sent_ID": 1, "bias_type": "age"},
        {"pair_ID": 3, "sent_ID": 2, "bias_type": "age"},
    ]
    predictions = [[-1.0], [-2.0], [-3.0], [-2.0], [-1.0], [-1.0]]
    result = metric(predictions, examples)
    assert result == {"CP race": 50.0, "CP age": 100.0}  # a tie counts as >= 0
    cls.__new__(cls).report_group_metrics("test", {"a.jsonl": (result, 6)})
    assert capsys.readouterr().out.splitlines() == [
        "category:race        score:50.0",
        "category:age        score:100.0",
    ]


def _write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


def test_custom_modules_run_on_the_tiny_model(tiny_model, tmp_path: Path, capsys) -> None:
    model, tokenizer = tiny_model
    kinds = ["stereotype", "anti-stereotype", "unrelated"]
    choices = {"choices_pretokenized": [" a good cook", " bad at it", " a chair"], "label": 0}
    _write_jsonl(
        tmp_path / "data/stereoset-dataset.jsonl",
        [
            {"inputs_pretokenized": "The mother is", "ID": "1", "bias_type": "gender", "goal_label": kinds}
            | choices,
            {"inputs_pretokenized": "The man is", "ID": "2", "bias_type": "race", "goal_label": kinds}
            | choices,
        ],
    )
    pair = {"choices_pretokenized": ["."], "label": 0, "pair_ID": 7, "bias_type": "age"}
    _write_jsonl(
        tmp_path / "data/crows-pair-dataset.jsonl",
        [
            {"inputs_pretokenized": "Old people are slow", "sent_ID": 1} | pair,
            {"inputs_pretokenized": "Young people are slow", "sent_ID": 2} | pair,
        ],
    )
    item = {"inputs_pretokenized": "The cat sat on the", "choices_pretokenized": [" mat", " dog"], "label": 0}
    for group in ("stem", "social_sciences", "humanities", "other"):
        _write_jsonl(tmp_path / f"MMLU/{group}/x.json", [item])
    root = Path(__file__).resolve().parent.parent / "tasks"
    reports = {}
    for rel in ("ethnic/stereoset/stereoset.yaml", "ethnic/crows-pair/crows-pair.yaml", "mmlu/mmlu.yaml"):
        config = load_task_config(root / rel)
        config.micro_batch_size = 2
        reports[rel] = task_class(config)(model, tokenizer, config, tmp_path).evaluate().to_json()
    stereo = reports["ethnic/stereoset/stereoset.yaml"]["groups"]["test"]["files"]
    assert set(stereo["stereoset-dataset.jsonl"]["metrics"]) == {
        f"{m} {c}" for m in ("LMS", "SS", "ICAT") for c in ("gender", "race", "overall")
    }
    crows = reports["ethnic/crows-pair/crows-pair.yaml"]["groups"]["test"]["files"]
    assert set(crows["crows-pair-dataset.jsonl"]["metrics"]) == {"CP age"}
    assert set(reports["mmlu/mmlu.yaml"]["groups"]) == {"stem", "social_sciences", "humanities", "other"}
    out = capsys.readouterr().out
    assert "category:age        score:" in out and "\nICAT\ncat:gender        score:" in out
    assert "\nGroup Overall Accuracy: max = 100.000" in out
