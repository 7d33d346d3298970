"""This project against llama.cpp on the same CPU, the same model shape and the same weight precisions.

Not run by CI. It needs llama-cpp-python and gguf, built for this CPU from source:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 gguf

(about 25 minutes on 2 cores). Then, from the repository root, on an otherwise idle machine:

    python -m bench.vs_llamacpp --json bench/results/vs-llamacpp.json

What it does:
1. Writes, once, into `--workdir`: a random-weight glm-600m checkpoint in fp16 (16 layers x 1536, 12 heads,
   FFN 4096, vocab 50048, the output layer tied to the word embeddings) in this project's layout, and a
   llama GGUF of the same shape (F16, the output tied to `token_embd`, a placeholder SentencePiece vocabulary
   of 50048 pieces), quantised by llama.cpp itself to Q8_0 and Q4_0. The two models' matrices have the same
   shapes (q, k, v, dense; the FFN's three 1536 x 4096 matrices: GeGLU's two halves and the way back here,
   SwiGLU's gate, up and down there), so a token costs both the same bytes and FLOPs; the values differ.
2. Runs, in `--rounds` interleaved rounds, each arm in a fresh process with `--threads` threads:
   project fp16 (fp32 arithmetic on fp16 matrices) vs llama.cpp F16; project INT8 with the INT8 output layer
   vs Q8_0; project INT4 with the INT8 output layer vs Q4_0 (and, with `--no-output-layer`, also project
   INT8 / INT4 with a 16-bit output layer). Each process warms up, then times the prefill of a
   `--prompt`-token prompt (random ids, logits of the last position only) and `--tokens` greedy decode steps.
   The project side runs `glm.decoding.generate` (the path the CLI and the server take), timing each token
   as `on_step` sees it: prefill is the time to the first token, decode the time of the `--tokens` after it.
   The llama side runs `Llama.eval` on the prompt, then on each greedy token, and takes the same times.
3. Records medians over the rounds, the ratios project / llama.cpp, the fp32 `torch.mv` memory bandwidth
   measured before and after, the CPU's name and SIMD flags, and each timed section's `other_cores` (cores
   other processes kept busy; near 0 means the figures are clean).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ARMS = {  # name: (project bits, project INT8 output layer, llama.cpp file type)
    "16-bit": (16, False, "F16"),
    "INT8 + INT8 output / Q8_0": (8, True, "Q8_0"),
    "INT4 + INT8 output / Q4_0": (4, True, "Q4_0"),
}
EXTRA_ARMS = {"INT8, 16-bit output": (8, False, None), "INT4, 16-bit output": (4, False, None)}
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")

PROJECT_PROBE = """
import json, time, torch
torch.set_num_threads({threads})
from bench.vs_llamacpp import timed
from glm.decoding import generate
from glm.decoding.strategies import BaseStrategy
from glm.loading import load_model
from glm.quantize import quantization_transform
transforms = [quantization_transform({bits}, output_layer={output_layer})] if {bits} < 16 else []
model, _ = load_model({folder!r}, transforms=transforms)
prompt = torch.randint(0, 50000, ({prompt},), generator=torch.Generator().manual_seed(0)).tolist()
def run(steps):  # the times at which each token is out: the first after the prefill
    stamps = [time.perf_counter()]
    (beams,) = generate(model, [prompt], BaseStrategy(1, top_k=1), 1 + steps,
                        on_step=lambda _: stamps.append(time.perf_counter()))
    assert len(beams[0]) == len(prompt) + 1 + steps and len(stamps) == steps + 2
    return stamps
print(json.dumps(timed(run, {tokens}, {repeats})))
"""

LLAMA_PROBE = """
import json, time, numpy as np
import llama_cpp
from bench.vs_llamacpp import timed
llm = llama_cpp.Llama({path!r}, n_ctx=512, n_batch=512, n_threads={threads}, n_threads_batch={threads},
                      verbose=False)
vocab = llm.n_vocab()
prompt = np.random.default_rng(0).integers(3, 50000, {prompt}).tolist()
def last_argmax():
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
    return int(logits.argmax())
def run(steps):  # the times at which each token is out: the first after the prefill
    stamps = [time.perf_counter()]
    llm.reset()
    llm.eval(prompt)
    token = last_argmax()
    stamps.append(time.perf_counter())
    for _ in range(steps):
        llm.eval([token])
        token = last_argmax()
        stamps.append(time.perf_counter())
    return stamps
print(json.dumps(timed(run, {tokens}, {repeats})))
"""


def timed(run, steps: int, repeats: int) -> dict[str, float]:
    """Run inside a probe process: after a warm-up run (the whole prompt, 2 steps), the best of `repeats`
    runs' prefill seconds (to the first token) and decode seconds (the `steps` tokens after it), with the
    cores other processes kept busy meanwhile. `run(steps)` returns the start time and each token's."""
    from bench.benchmark import cpu_snapshot, other_cores

    run(2)
    before = cpu_snapshot()
    stamps = [run(steps) for _ in range(repeats)]
    return {
        "prefill_s": min(s[1] - s[0] for s in stamps),
        "decode_s": min(s[-1] - s[1] for s in stamps),
        "other_cores": other_cores(before, cpu_snapshot()),
    }


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS_OF_INTEREST if f in present]
    except OSError:
        pass
    return []


def write_project_checkpoint(folder: Path, seed: int) -> None:
    import torch

    from bench.benchmark import build_model
    from glm.checkpoint import save_checkpoint
    from glm.config import get_preset

    config = get_preset("glm-600m")
    model = build_model(config, torch.float16, torch.device("cpu"), seed)
    save_checkpoint(model.state_dict(), folder, config)


def write_gguf(path: Path, seed: int) -> None:
    """A llama GGUF of glm-600m's shape with random F16 matrices (std 0.02) and a placeholder vocabulary."""
    import gguf
    import numpy as np

    from glm.config import get_preset

    config = get_preset("glm-600m")
    h, ffn, vocab, heads = (
        config.hidden_size,
        config.inner_hidden_size,
        config.vocab_size,
        config.num_attention_heads,
    )
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np.float16)

    def matrix(rows: int, cols: int) -> np.ndarray:  # tiled from one random block: fast, values irrelevant
        return np.resize(np.roll(block, int(rng.integers(block.size))), rows * cols).reshape(rows, cols)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_sequence_length)
    writer.add_embedding_length(h)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(h // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", matrix(vocab, h))
    for i in range(config.num_layers):
        for name, shape in [
            ("attn_q", (h, h)), ("attn_k", (h, h)), ("attn_v", (h, h)), ("attn_output", (h, h)),
            ("ffn_gate", (ffn, h)), ("ffn_up", (ffn, h)), ("ffn_down", (h, ffn)),
        ]:  # fmt: skip
            writer.add_tensor(f"blk.{i}.{name}.weight", matrix(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_gguf(source: Path, target: Path, file_type: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise SystemExit(f"llama.cpp could not quantise {source} to {file_type} (status {status})")


def prepare(workdir: Path, seed: int) -> tuple[Path, dict[str, Path]]:
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / "glm-600m-fp16"
    if not (folder / "model_config.json").exists():
        print(f"writing {folder} ...", flush=True)
        write_project_checkpoint(folder, seed)
    ggufs = {"F16": workdir / "glm-600m-shape-F16.gguf"}
    if not ggufs["F16"].exists():
        print(f"writing {ggufs['F16']} ...", flush=True)
        partial = ggufs["F16"].with_suffix(".partial")
        write_gguf(partial, seed)
        partial.rename(ggufs["F16"])
    for file_type in ("Q8_0", "Q4_0"):
        ggufs[file_type] = workdir / f"glm-600m-shape-{file_type}.gguf"
        if not ggufs[file_type].exists():
            print(f"quantising to {file_type} ...", flush=True)
            partial = ggufs[file_type].with_suffix(".partial")
            quantize_gguf(ggufs["F16"], partial, file_type)
            partial.rename(ggufs[file_type])
    return folder, ggufs


def probe(code: str) -> dict[str, float]:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bandwidth() -> float:
    import torch

    from bench.benchmark import memory_bandwidth

    return memory_bandwidth(torch.device("cpu"), 5)["median_gb_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/glm-vs-llamacpp"), help="models written here"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy decode steps")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per process (the best is kept)")
    parser.add_argument(
        "--no-output-layer", action="store_true", help="also INT8 / INT4 with a 16-bit output"
    )
    parser.add_argument("--arms", nargs="*", help="only these arms (names as printed)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from bench.machine import cpu_name

    folder, ggufs = prepare(args.workdir, args.seed)
    arms = {**ARMS, **(EXTRA_ARMS if args.no_output_layer else {})}
    if args.arms:
        arms = {k: v for k, v in arms.items() if k in args.arms}
    fields = {"threads": args.threads, "prompt": args.prompt, "tokens": args.tokens, "repeats": args.repeats}
    bandwidth_before = bandwidth()
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {"project": [], "llama.cpp": []} for name in arms
    }
    for round_ in range(args.rounds):
        for name, (bits, output_layer, file_type) in arms.items():
            ours = probe(
                PROJECT_PROBE.format(folder=str(folder), bits=bits, output_layer=output_layer, **fields)
            )
            runs[name]["project"].append(ours)
            line = f"round {round_ + 1} {name}: project {args.tokens / ours['decode_s']:.1f} tok/s"
            if file_type is not None:
                theirs = probe(LLAMA_PROBE.format(path=str(ggufs[file_type]), **fields))
                runs[name]["llama.cpp"].append(theirs)
                line += f", llama.cpp {args.tokens / theirs['decode_s']:.1f} tok/s"
            print(line, flush=True)
    bandwidth_after = bandwidth()

    results = []
    for name, sides in runs.items():
        row: dict[str, Any] = {"arm": name}
        for side, samples in sides.items():
            if samples:
                row[side] = {
                    "decode_tok_s": args.tokens / statistics.median(s["decode_s"] for s in samples),
                    "prefill_s": statistics.median(s["prefill_s"] for s in samples),
                    "max_other_cores": max(s["other_cores"] for s in samples),
                    "samples": samples,
                }
        if "llama.cpp" in row:
            row["decode_ratio"] = row["project"]["decode_tok_s"] / row["llama.cpp"]["decode_tok_s"]
            row["prefill_ratio"] = row["llama.cpp"]["prefill_s"] / row["project"]["prefill_s"]  # rate ratio
        results.append(row)

    print(f"\n{cpu_name()} ({' '.join(cpu_flags())}), {args.threads} threads; fp32 torch.mv "
          f"{bandwidth_before:.1f} GB/s before, {bandwidth_after:.1f} after")  # fmt: skip
    print(
        f"| weights | project decode tok/s | llama.cpp | ratio | prefill {args.prompt}: project / llama.cpp |"
    )
    print("|---|---|---|---|---|")
    for row in results:
        ours, theirs = row["project"], row.get("llama.cpp")
        if theirs is None:
            print(f"| {row['arm']} | {ours['decode_tok_s']:.1f} | | | {ours['prefill_s']:.2f} s |")
            continue
        print(
            f"| {row['arm']} | {ours['decode_tok_s']:.1f} | {theirs['decode_tok_s']:.1f} "
            f"| {row['decode_ratio']:.2f} | {ours['prefill_s']:.2f} s / {theirs['prefill_s']:.2f} s "
            f"({row['prefill_ratio']:.2f}) |"
        )
    if args.json:
        record = {
            "cpu": cpu_name(),
            "cpu_flags": cpu_flags(),
            "bandwidth_gb_s": {"before": bandwidth_before, "after": bandwidth_after},
            **fields,
            "rounds": args.rounds,
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
