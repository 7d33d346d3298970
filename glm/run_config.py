"""Declarative run configs (`configs/*.yaml`, as the original's `configs/model_glm_130b*.sh`).

A run config names the model shape, the tokenizer, the tensor-parallel size, the quantization and the
offload budget. Every key is the default of the command-line flag of the same name; a flag given on the
command line wins. `--config` takes a preset name (a file in configs/, or a model-shape preset of
glm.config), or a path to a YAML run config or to a model-shape JSON file.

    model: glm-130b            # a preset name, or a mapping of model-shape fields
    tokenizer_type: icetk
    tensor_parallel_size: 4
    quantization_bit_width: 4
    max_memory: 22GiB

`python -m glm.run_config NAME [KEY]` prints a config (or one value, for shell scripts).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

from glm.config import PRESETS, GLMConfig, get_preset

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The model `scripts/generate.sh` runs when no checkpoint is given.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "glm-bilingual"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's settings; None means "the flag's own default" (or what the checkpoint stores)."""

    model: GLMConfig | None = None
    checkpoint: str | None = None
    tokenizer: str | None = None
    tokenizer_type: str | None = None
    tensor_parallel_size: int | None = None
    quantization_bit_width: int | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    dtype: str | None = None
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["model"] = None if self.model is None else self.model.to_dict()
        return values


_FIELDS = [f.name for f in dataclasses.fields(RunConfig)]
_PATHS = ("checkpoint", "tokenizer", "offload_folder")


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def _nearest(key: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(key, choices, n=1)
    return f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(choices)}"


def parse_run_config(values: dict[str, Any], source: str, base: Path | None = None) -> RunConfig:
    """A RunConfig from a mapping; unknown keys (kebab-case accepted) are errors naming the nearest."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: a run config is a mapping of keys to values")
    fields: dict[str, Any] = {}
    for raw, value in values.items():
        key = str(raw).replace("-", "_")
        if key not in _FIELDS:
            raise ValueError(f"{source}: unknown run config key '{raw}'{_nearest(key, _FIELDS)}")
        fields[key] = value
    model = fields.get("model")
    if isinstance(model, str):
        fields["model"] = get_preset(model)
    elif isinstance(model, dict):
        fields["model"] = GLMConfig.from_dict(model, source=f"{source}: model")
    elif model is not None:
        raise ValueError(f"{source}: 'model' is a preset name ({', '.join(PRESETS)}) or a mapping")
    for key in ("tensor_parallel_size", "quantization_bit_width"):
        if fields.get(key) is not None and not isinstance(fields[key], int):
            raise ValueError(f"{source}: '{key}' must be an integer, got {fields[key]!r}")
    if fields.get("quantization_bit_width") not in (None, 4, 8):
        raise ValueError(f"{source}: quantization_bit_width must be 4 or 8 (or absent for none)")
    if fields.get("max_memory") is not None:
        from glm.sizes import parse_memory

        fields["max_memory"] = str(fields["max_memory"])
        parse_memory(fields["max_memory"], 1)
    for key in _PATHS:
        if fields.get(key) is not None and base is not None and not Path(fields[key]).is_absolute():
            fields[key] = str((base / fields[key]).resolve())
    return RunConfig(**fields)


def load_run_config(config: str | Path | RunConfig | GLMConfig | None) -> RunConfig:
    """A preset name, a YAML run config, a model-shape JSON file, or an already-built config."""
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, GLMConfig):
        return RunConfig(model=config)
    name = str(config)
    path = CONFIGS / f"{name}.yaml"
    if "/" not in name and path.is_file():
        return _read_yaml(path)
    if name in PRESETS:
        return RunConfig(model=get_preset(name))
    path = Path(name)
    if not path.is_file():
        names = ", ".join(sorted({*presets(), *PRESETS}))
        near = difflib.get_close_matches(name, [*presets(), *PRESETS], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"--config {name}: neither a preset{hint} ({names}) nor a file")
    if path.suffix == ".json":
        return RunConfig(model=GLMConfig.from_file(path))
    return _read_yaml(path)


def _read_yaml(path: Path) -> RunConfig:
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"run config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_run_config(values or {}, str(path), base=path.parent)


def apply_run_config(args: argparse.Namespace) -> RunConfig:
    """Fill every flag the user left unset (None) from `args.config`, and keep the resolved run config as
    `args.run_config` (the loader reads it there instead of applying it again)."""
    run = load_run_config(getattr(args, "config", None))
    for key in _FIELDS:
        if key != "model" and hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, getattr(run, key))
    # --checkpoint defaults to the bundled model rather than None: left at that default, the config's wins.
    if run.checkpoint is not None and getattr(args, "checkpoint", None) == str(DEFAULT_MODEL):
        args.checkpoint = run.checkpoint
    args.run_config = run
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_config", description="Print a run config (or one key).")
    parser.add_argument("config", help=f"a preset ({', '.join(presets())}) or a YAML file")
    parser.add_argument("key", nargs="?", help="print only this key's value (empty when unset)")
    args = parser.parse_args(argv)
    try:
        run = load_run_config(args.config)
        if args.key is not None and args.key.replace("-", "_") not in _FIELDS:
            raise ValueError(f"unknown run config key '{args.key}'{_nearest(args.key, _FIELDS)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    values = run.to_dict()
    if args.key is None:
        print(yaml.safe_dump(values, sort_keys=False), end="")
    else:
        value = values[args.key.replace("-", "_")]
        print("" if value is None else value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
