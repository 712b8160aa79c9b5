"""The ``kdcache`` command line: each command parses its flags and calls one function.

Errors end the output with one line, after every progress bar is closed: ``error: ...`` naming
what is wrong (the sample, the key) and the fix, exit code 2, for the user's errors
(``_user_errors``); for anything else the traceback, then one ``error:`` line with the
exception's last line and what Python noted on the way (the sample being written), exit code 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .config import VLLM_GPU_MEMORY_ALONE as _VLLM_ALONE
from .config import VllmConfig as _VLLM  # the vLLM flags' defaults (a stdlib-only module)
from .config import DumpConfig as _DUMP, TrainConfig as _TRAIN  # defaults of flags (dist_timeout_s)

# OpenMP threads that spin while waiting make a contended CPU (data-loader workers, other jobs)
# 10-20x slower; passive waiting costs nothing measurable. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _App(typer.Typer):
    """``typer.Typer`` whose unexpected errors still end with one ``error:`` line (``_crash``)."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as e:  # SystemExit (typer.Exit, _fail) and KeyboardInterrupt pass through
            _crash(e)


app = _App(
    name="kdcache",
    help=(
        "Offline LLaVA-KD: dump a multimodal teacher's sparse targets to a Zarr cache once "
        "(big GPU box), then distil students from the cache (small GPUs) without the teacher.\n\n"
        "Typical flow (the README's \"The commands\" has every step):\n\n"
        "  kdcache make-data --out data --num-images 6000 --student-images 1000\n\n"
        "  kdcache init-model --preset tiny-teacher --tokenizer data/tokenizer --out models/teacher\n\n"
        "  kdcache dump --teacher runs/t-sft --data data/instruct_small.json --images data/images --out caches/t.zarr "
        "--top-k 64\n\n"
        "  kdcache train --stage dft --student runs/s-sft --data data/instruct_small.json --images data/images "
        "--cache caches/t.zarr --out runs/s-dft --batch-size 32 --epochs 6 --lr 1e-3\n\n"
        "  kdcache run pipelines/llava_kd.yaml      (a whole recipe)\n\n"
        "  kdcache demo --quick                     (everything, end to end, on CPU)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"kdcache {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    """kdcache: offline LLaVA-KD."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed as one line, exit code 2, no traceback."""
    from .backends import BackendUnavailable
    from .cache.format import CacheCorrupt, CacheFormatError, CacheMismatch
    from .cache.store import CacheLocationError
    from .cache.writer import CacheLocked
    from .config import ConfigError
    from .data.llava import DataError, SampleError
    from .dump import DumpError
    from .models import ModelLoadError
    from .train import RunMismatchError

    return (BackendUnavailable, CacheLocationError, ConfigError, DumpError, ModelLoadError, CacheMismatch, CacheCorrupt, CacheFormatError,
            CacheLocked, RunMismatchError, DataError, SampleError, FileNotFoundError,
            NotADirectoryError, PermissionError)


def _close_bars() -> None:
    """Close every open tqdm bar (ours, transformers', accelerate's): the error printed next is
    then the last line, not followed by a bar tqdm redraws when the interpreter exits."""
    if "tqdm" not in sys.modules:
        return
    from tqdm.std import tqdm

    for bar in list(tqdm._instances):  # every subclass's bars (tqdm.auto's too) live in one set
        bar.close()


def _message(e: Exception) -> str:
    """The error line's text: ours say what and how to fix; the OS's file errors get the fix."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError, PermissionError)) and e.filename:
        what = {FileNotFoundError: "does not exist", NotADirectoryError: "is not a directory",
                PermissionError: "cannot be accessed (permission denied)"}[type(e)]
        return f"{e.filename} {what}: check the path (relative paths start at {os.getcwd()})"
    return str(e)


def _fail(e: Exception) -> None:
    _close_bars()
    typer.secho(f"error: {_message(e)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _worker_user_error(e: Exception) -> str | None:
    """The message of a user error raised in a DataLoader worker, else None. torch re-raises a
    worker's exception as ``RuntimeError("Caught SampleError in DataLoader worker process 0.\n
    Original Traceback ...\nkdcache.data.llava.SampleError: <message>")`` when it cannot rebuild
    it from one string (SampleError takes four arguments)."""
    text = str(e)
    names = {cls.__name__: f"{cls.__module__}.{cls.__qualname__}: " for cls in _user_errors()}
    first = text.split(" ", 2)
    if len(first) < 3 or first[0] != "Caught" or first[1] not in names or "DataLoader worker" not in first[2]:
        return None
    prefix = names[first[1]]
    last = next((ln for ln in reversed(text.splitlines()) if ln.startswith(prefix)), None)
    return last[len(prefix):] if last else None


def _crash(e: Exception) -> None:
    """An error that is not the user's: the traceback (for a bug report), then one line. A user
    error raised in a DataLoader worker is printed as one line, as ``_fail`` does."""
    import traceback

    _close_bars()
    msg = _worker_user_error(e)
    if msg is not None:
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    traceback.print_exception(e)
    # the last line of the message: a DataLoader worker's other errors arrive as a RuntimeError
    # whose message ends with the original exception's line
    last = next((ln.strip() for ln in reversed(str(e).splitlines()) if ln.strip()), "")
    notes = "".join(f" ({n})" for n in getattr(e, "__notes__", []))
    typer.secho(f"error: {type(e).__name__}: {last}{notes}. Unexpected: the traceback above shows where (report it "
                "if it is a kdcache bug); work committed so far is kept, rerun the same command to resume",
                fg=typer.colors.RED, err=True)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------


@app.command("make-data")
def make_data(
    out: Path = typer.Option(..., help="Output directory (images/, *.json, tokenizer/)."),
    num_images: int = typer.Option(2000, help="Training images (captions + instructions)."),
    qa_per_image: int = typer.Option(5, help="Question-answer pairs per training image."),
    num_val: int = typer.Option(300, help="Validation questions (held-out images; choose settings here)."),
    num_eval: int = typer.Option(500, help="Evaluation questions (held-out images; report only)."),
    student_images: int = typer.Option(0, help="Also write *_small.json with the first N images (0: none)."),
    image_size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives byte-identical files."),
):
    """Write the synthetic shapes dataset (LLaVA format) and its BPE tokenizer.

    Example: kdcache make-data --out data --num-images 6000 --student-images 1000
    """
    from .data.synthetic import make_synthetic

    paths = make_synthetic(out, num_images=num_images, qa_per_image=qa_per_image, num_val=num_val,
                           num_eval=num_eval, image_size=image_size, seed=seed,
                           student_images=student_images or None)
    for k, v in paths.items():
        typer.echo(f"{k:>16}: {v}")


@app.command("init-model")
def init_model(
    out: Path = typer.Option(..., help="Where to save the assembled LLaVA checkpoint directory."),
    preset: Optional[str] = typer.Option(None, help="tiny-teacher | tiny-assistant | tiny-student (random, CPU "
                                                    "seconds) | random:qwen2.5-3b etc. (real shapes, random)."),
    llm: Optional[str] = typer.Option(None, help="Pretrained LLM: alias (qwen2.5-0.5b), hub id or directory."),
    vision: Optional[str] = typer.Option(None, help="SigLIP tower: hub id or directory "
                                                    "(default google/siglip-so400m-patch14-384)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer directory (tiny presets: the one make-data wrote)."),
    seed: int = typer.Option(0, help="Seed of the fresh projector / random weights."),
):
    """Assemble a LLaVA model TinyLLaVA-style (LLM + SigLIP + fresh GELU projector) and save it.

    Examples:
      kdcache init-model --preset tiny-teacher --tokenizer data/tokenizer --out models/teacher
      kdcache init-model --llm qwen2.5-0.5b --out models/qwen2.5-0.5b-siglip
    """
    from .models import ModelLoadError
    from .models import init_model as _init

    try:
        p = _init(out, preset=preset, llm=llm, vision=vision, tokenizer=tokenizer, seed=seed)
    except ModelLoadError as e:
        _fail(e)
    typer.echo(f"saved {p}")


@app.command()
def forward(
    model: str = typer.Option(..., help="LLaVA directory, hub id or path."),
    data: Path = typer.Option(..., help="LLaVA JSON."),
    images: Path = typer.Option(..., help="Image root directory."),
    batch_size: int = typer.Option(4, help="Samples in the batch."),
    template: str = typer.Option("chat", help="chat | qwen2_base | pretrain"),
):
    """Run one forward pass on the first batch and print shapes and the loss (a smoke test).

    Example: kdcache forward --model runs/t-sft --data data/instruct.json --images data/images
    """
    from .evaluate import forward_smoke

    for line in forward_smoke(model, str(data), str(images), batch_size=batch_size, template=template):
        typer.echo(line)


# The vLLM engine flags of dump and generate (one definition, defaults from VllmConfig).
_VLLM_TP = typer.Option(_VLLM.tensor_parallel_size, help="--backend vllm: GPUs the teacher is split over.")
_VLLM_TOKENS = typer.Option(_VLLM.max_num_batched_tokens,
                            help="--backend vllm: tokens per engine step. Keep it modest for dump: prompt log-probs "
                                 "materialise tokens x vocab float32 logits (8192 x 152k = 5 GiB).")
_VLLM_DTYPE = typer.Option(_VLLM.dtype, help="--backend vllm: bfloat16 | float16 | float32 (dump: the HF copy is "
                                             "loaded in it too).")
_VLLM_MEM = typer.Option(_VLLM.gpu_memory_utilization,
                         help="--backend vllm: vLLM's share of GPU memory; default 0.6 when a dump's hidden states "
                              "are computed (the HF teacher shares the GPU), else 0.9.")
_VLLM_LEN = typer.Option(_VLLM.max_model_len, help="--backend vllm: context length (default: the model's).")
# generate's own texts for the engine flags it shares with dump (no prompt log-probs, no HF copy)
_GEN_VLLM_TOKENS = typer.Option(_VLLM.max_num_batched_tokens, help="--backend vllm: tokens per engine step.")
_GEN_VLLM_DTYPE = typer.Option(_VLLM.dtype, help="--backend vllm: bfloat16 | float16 | float32.")
_GEN_VLLM_MEM = typer.Option(_VLLM.gpu_memory_utilization,
                             help=f"--backend vllm: vLLM's share of GPU memory (default {_VLLM_ALONE}: it has "
                                  "the GPU alone).")
# How to reach a cache URL (every command that takes a cache). Credentials: the AWS_* variables,
# AWS_PROFILE or an instance role, AWS_ENDPOINT_URL for S3-compatible servers; never printed.
_STORAGE = typer.Option(None, "--storage-option", metavar="KEY=VALUE",
                        help="fsspec storage option for a cache URL, repeatable (endpoint_url=http://host:9000, "
                             "anon=true, client_kwargs.region_name=eu-west-1). Credentials come from the AWS_* "
                             "variables / AWS_PROFILE / instance role (AWS_ENDPOINT_URL for S3-compatible servers).")


def _cache_arg(value: str, options: Optional[list[str]], what: str = "cache"):
    """A cache argument and its --storage-option flags -> a CacheLocation (one line on error)."""
    from .cache.store import CacheLocationError, cache_location, parse_storage_options

    try:
        return cache_location(value, parse_storage_options(options), what=what)
    except CacheLocationError as e:
        _fail(e)


@app.command()
def dump(
    teacher: str = typer.Option(..., help="Teacher: LLaVA directory, hub id, or alias (aliases are refused "
                                          "until a projector is trained)."),
    data: Path = typer.Option(..., help="LLaVA JSON (558k captions or 665k conversations format)."),
    images: Path = typer.Option(..., help="Directory the JSON's image paths are relative to."),
    out: str = typer.Option(..., help="Cache to write or finish: a Zarr v3 directory (e.g. caches/t.zarr) or a "
                                      "URL (s3://bucket/prefix/t.zarr, gs://..., any fsspec protocol)."),
    top_k: int = typer.Option(_DUMP.top_k, help="Top-k ids kept per position (k = vocabulary size: exact; "
                                          "not used with --targets sampled:N)."),
    positions: str = typer.Option(",".join(_DUMP.positions), help="Position kinds: visual,response[,prompt]."),
    hidden: str = typer.Option(_DUMP.hidden, help="Visual hidden states for L_rel: bf16 | fp16 | float32 | none. With "
                                            "--backend vllm they come from an HF forward of the teacher (none: "
                                            "skip it, no L_rel targets)."),
    relation: str = typer.Option(_DUMP.relation, help="L_rel targets: hidden (visual hidden states) | none | "
                                                      "lowrank:R (rank-R factor of the logit Gram in the --hidden "
                                                      "dtype, ~93 KB/sample at R = 64; error recorded per sample)."),
    logprob_dtype: str = typer.Option(_DUMP.logprob_dtype, help="float16 | float32"),
    temperature: float = typer.Option(_DUMP.temperature, help="Dump softmax temperature (recorded; KD temperature is train's)."),
    targets: str = typer.Option(_DUMP.targets, help="topk: the --top-k ids, log-probs and tail mass per position | "
                                                    "hidden: exact, topk plus the LM head's input at every position "
                                                    "and the LM head once | sampled:N: N ids drawn from the "
                                                    "teacher's distribution with their counts (--top-k unused) | "
                                                    "topp:P[,K]: per position the fewest top ids whose mass reaches P "
                                                    "(at most K, default --top-k), stored ragged, with the tail."),
    draw_seed: int = typer.Option(_DUMP.draw_seed, help="--targets sampled:N: seed of the draws (per sample: "
                                                        "this seed and its row; reruns are identical)."),
    batch_size: int = typer.Option(_DUMP.batch_size, help="Samples per teacher forward."),
    max_length: int = typer.Option(_DUMP.max_length, help="Longest sample in tokens (image expanded)."),
    on_too_long: str = typer.Option(_DUMP.on_too_long, help="A sample longer than --max-length: skip (counted) | "
                                                            "error | truncate (cut to --max-length as LLaVA's "
                                                            "training does; train must truncate alike)."),
    template: str = typer.Option(_DUMP.template, help="chat (the tokenizer's) | qwen2_base | pretrain"),
    num_workers: int = typer.Option(_DUMP.num_workers, help="Data-loading processes."),
    device: str = typer.Option(_DUMP.device, help="auto | cpu | cuda | cuda:N"),
    commit_every_s: float = typer.Option(_DUMP.commit_every_s, help="Commit at least this often (seconds of teacher work a "
                                                    "crash may lose; 0 = after every batch)."),
    dist_timeout_s: float = typer.Option(_DUMP.dist_timeout_s, help="Multi-rank: how long a rank waits for a "
                                                                    "dead peer before failing."),
    bucket_batches: int = typer.Option(_DUMP.bucket_batches, help="Sort each window of this many batches by "
                                                                  "length before batching (less padding); 1 = data "
                                                                  "order. The cache is written in row order either way."),
    write_thread: bool = typer.Option(_DUMP.write_thread, help="Copy, compress and write records on a thread "
                                                                "while the teacher runs the next batch."),
    compile: bool = typer.Option(_DUMP.compile, "--compile/--no-compile",
                                 help="torch.compile the teacher's vision tower and LLM (dynamic lengths; the "
                                      "first batches wait for the compile, later ones run faster)."),
    backend: str = typer.Option(_DUMP.backend, help="hf (Hugging Face, the reference) | vllm (needs `pip install "
                                           "'kdcache\\[vllm]'`: log-probs from vLLM with the tail from the top-k "
                                           "alone; temperature 1; one process; hidden states from HF, see below)."),
    vllm_tensor_parallel_size: int = _VLLM_TP,
    vllm_max_num_batched_tokens: int = _VLLM_TOKENS,
    vllm_dtype: str = _VLLM_DTYPE,
    vllm_gpu_memory_utilization: Optional[float] = _VLLM_MEM,
    vllm_max_model_len: Optional[int] = _VLLM_LEN,
    vllm_hf_batch_size: int = typer.Option(_VLLM.hf_batch_size, help="--backend vllm with hidden states: samples "
                                                                     "per HF hidden-state forward."),
    storage_option: Optional[list[str]] = _STORAGE,
):
    """Dump the teacher's top-k log-probs, tail mass and visual hidden states into a Zarr cache.

    Resumable: run the same command again after a crash. Multi-GPU: torchrun/accelerate launch,
    one part per rank (--backend hf).

    --backend vllm serves the teacher with vLLM (prompt log-probs of the teacher-forced sequence);
    give it large batches (--batch-size 256), vLLM schedules them itself. vLLM returns no hidden
    states: with --hidden bf16 (hybrid) the HF teacher, on the same GPU, computes them on each
    sample's prefix up to the image's end, and vLLM gets --vllm-gpu-memory-utilization (0.6) of
    the GPU; --hidden none skips the HF forward (no L_rel targets). The cache's settings record
    backend: vllm. Not yet run against a real vLLM engine on this project's machines.

    Example: kdcache dump --teacher runs/t-sft --data data/instruct_small.json --images data/images
             --out caches/t.zarr --top-k 64

    Example: kdcache dump --backend vllm --teacher runs/t-sft --data data/instruct.json --images data/images
             --out caches/t-vllm.zarr --batch-size 256 --hidden none
    """
    from .backends import BackendUnavailable
    from .config import DumpConfig
    from .dump import dump as _dump
    from .positions import parse_kinds

    loc = _cache_arg(out, storage_option, what="--out")
    try:
        cfg = DumpConfig(teacher=teacher, data=str(data), images=str(images), out=out, top_k=top_k,
                         positions=parse_kinds(positions), hidden=hidden, relation=relation,
                         logprob_dtype=logprob_dtype,
                         temperature=temperature, targets=targets, draw_seed=draw_seed, batch_size=batch_size,
                         max_length=max_length, on_too_long=on_too_long, template=template,
                         num_workers=num_workers, device=device,
                         commit_every_s=commit_every_s, dist_timeout_s=dist_timeout_s, bucket_batches=bucket_batches,
                         write_thread=write_thread, compile=compile,
                         backend=backend,
                         vllm=_VLLM(tensor_parallel_size=vllm_tensor_parallel_size,
                                    max_num_batched_tokens=vllm_max_num_batched_tokens, dtype=vllm_dtype,
                                    gpu_memory_utilization=vllm_gpu_memory_utilization,
                                    max_model_len=vllm_max_model_len, hf_batch_size=vllm_hf_batch_size),
                         storage_options=loc.storage_options)
        _dump(cfg)
    except (ValueError, BackendUnavailable, *_user_errors()) as e:
        _fail(e)


@app.command()
def generate(
    teacher: str = typer.Option(..., help="Teacher: LLaVA directory or hub id."),
    data: Path = typer.Option(..., help="LLaVA JSON whose assistant turns are rewritten."),
    images: Path = typer.Option(..., help="Directory the JSON's image paths are relative to."),
    out: Path = typer.Option(..., help="New LLaVA JSON (progress in OUT.partial.jsonl; rerun to resume)."),
    max_new_tokens: int = typer.Option(256, help="Longest generated answer per turn."),
    temperature: float = typer.Option(0.0, help="Sampling temperature of generation (0: greedy); not the KD "
                                                "temperature of train."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, help="Sampling seed (one stream per batch and turn: a resumed run repeats it)."),
    backend: str = typer.Option("hf", help="hf | vllm (needs `pip install 'kdcache\\[vllm]'`)."),
    template: str = typer.Option("chat", help="chat | qwen2_base | pretrain"),
    batch_size: int = typer.Option(8, help="Samples generated together."),
    max_length: int = typer.Option(2048, help="Longest prompt + answer in tokens (longer samples are left out)."),
    vllm_tensor_parallel_size: int = _VLLM_TP,
    vllm_max_num_batched_tokens: int = _GEN_VLLM_TOKENS,
    vllm_dtype: str = _GEN_VLLM_DTYPE,
    vllm_gpu_memory_utilization: Optional[float] = _GEN_VLLM_MEM,
    vllm_max_model_len: Optional[int] = _VLLM_LEN,
):
    """Rewrite the assistant turns with the teacher's own answers, turn by turn (each turn sees the
    teacher's earlier answers). Ids, images and extra keys are kept. Resumable.

    Example: kdcache generate --teacher runs/t-sft --data data/instruct_small.json --images data/images
             --out data/instruct_teacher.json --max-new-tokens 16
    """
    from .backends import BackendUnavailable
    from .generate import GenerateError, generate_dataset

    try:
        rep = generate_dataset(teacher, str(data), str(images), str(out), max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, backend=backend, template=template,
                               batch_size=batch_size, max_length=max_length,
                               vllm=_VLLM(tensor_parallel_size=vllm_tensor_parallel_size,
                                          max_num_batched_tokens=vllm_max_num_batched_tokens, dtype=vllm_dtype,
                                          gpu_memory_utilization=vllm_gpu_memory_utilization,
                                          max_model_len=vllm_max_model_len))
    except (GenerateError, BackendUnavailable, *_user_errors()) as e:
        _fail(e)
    skipped = ", ".join(f"{n} {r}" for r, n in sorted(rep["skipped"].items())) or "none"
    typer.echo(f"wrote {rep['out']}: {rep['samples']} samples ({rep['generated_now']} generated in this run); "
               f"skipped: {skipped}; empty answers: {rep['empty_answers']}")


@app.command()
def verify(
    cache: str = typer.Argument(..., help="Cache: a directory or URL (s3://bucket/prefix/t.zarr)."),
    vocab_size: Optional[int] = typer.Option(None, help="Expected vocabulary size (default: the cache's)."),
    storage_option: Optional[list[str]] = _STORAGE,
):
    """Check every committed sample of a cache; exit 1 naming what is wrong and where.

    Example: kdcache verify caches/t.zarr
    """
    from .cache.verify import verify_cache

    try:
        rep = verify_cache(_cache_arg(cache, storage_option), vocab_size=vocab_size)
    except _user_errors() as e:
        _fail(e)
    typer.echo(str(rep))
    if not rep.ok:
        typer.secho(f"error: {rep.verdict()}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=0 if rep.ok else 1)


@app.command()
def inspect(
    cache: str = typer.Argument(..., help="Cache: a directory or URL (s3://bucket/prefix/t.zarr)."),
    sample: Optional[str] = typer.Option(None, help="Show the top tokens per position of this sample id."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer to decode ids (default: the teacher's)."),
    top: int = typer.Option(5, help="Tokens per position in --sample tables."),
    storage_option: Optional[list[str]] = _STORAGE,
):
    """Summarise a cache: samples, tokens, positions per kind, bytes, kept mass, teacher accuracy.

    Example: kdcache inspect caches/t.zarr --sample syn-000003
    """
    from .inspect_cache import UnknownSample, inspect_cache

    try:
        lines = inspect_cache(_cache_arg(cache, storage_option), sample=sample, tokenizer=tokenizer, top=top)
    except (UnknownSample, *_user_errors()) as e:
        _fail(e)
    for line in lines:
        typer.echo(line)


@app.command()
def export(
    cache: str = typer.Argument(..., help="Cache: a directory or URL (s3://bucket/prefix/t.zarr)."),
    parquet: str = typer.Option(..., help="Parquet file to write (one row per distilled position): a path or "
                                          "URL (s3://bucket/t.parquet; the same --storage-option)."),
    storage_option: Optional[list[str]] = _STORAGE,
):
    """Export a cache to Parquet for pandas / DuckDB / Polars.

    Example: kdcache export caches/t.zarr --parquet t.parquet
    """
    from .cache.arrow import export_parquet

    try:
        n = export_parquet(_cache_arg(cache, storage_option),
                           _cache_arg(parquet, storage_option, what="Parquet output"))
    except _user_errors() as e:
        _fail(e)
    typer.echo(f"wrote {parquet} ({n} rows)")


@app.command()
def train(
    stage: str = typer.Option(..., help="pt | dpt | sft | dft"),
    student: str = typer.Option(..., help="Student LLaVA directory or hub id."),
    data: Path = typer.Option(..., help="LLaVA JSON."),
    images: Path = typer.Option(..., help="Image root directory."),
    out: Path = typer.Option(..., help="Output directory (checkpoint, metrics.jsonl)."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache (dpt/dft, offline: the teacher is never loaded): a "
                                                   "directory or URL (s3://bucket/prefix/t.zarr)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model for online KD (reference / baseline)."),
    config: Optional[Path] = typer.Option(None, help="YAML with TrainConfig keys; flags given here win."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (default 1)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Per-device batch size (default 8)."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps (default 1)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the paper's for 0.5B-3B LLMs, 1e-3 pt/dpt, "
                                                  "2e-5 sft/dft; the tiny presets want ~2e-3 sft, 1e-3 dft)."),
    seed: Optional[int] = typer.Option(None, help="Seed (data order, init)."),
    template: Optional[str] = typer.Option(None, help="chat | qwen2_base | pretrain"),
    max_length: Optional[int] = typer.Option(None, help=f"Longest sample in tokens, image expanded (default "
                                                        f"{_TRAIN.max_length}; a cache's dump --max-length)."),
    on_too_long: Optional[str] = typer.Option(None, help="A sample longer than --max-length: skip (default) | error | "
                                                         "truncate (needed for a cache dumped with truncate)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, help="Recompute activations to save memory."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N optimizer steps (0: only at the end)."),
    log_every: Optional[int] = typer.Option(None, help="Log metrics every N optimizer steps."),
    on_nan: Optional[str] = typer.Option(None, help="Non-finite loss: skip the step | stop the run."),
    dist_timeout_s: Optional[float] = typer.Option(None, help="Multi-rank: how long a rank waits for a dead peer "
                                                             f"before failing (default {_TRAIN.dist_timeout_s:g})."),
    storage_option: Optional[list[str]] = _STORAGE,
    cache_dir: Optional[str] = typer.Option(None, help="A --cache URL: keep a local disk copy of every object "
                                                       "fetched in this directory (later epochs and runs fetch "
                                                       "nothing)."),
):
    """Train one stage. Loss: L_reg + a L_res + b L_vis + g L_rel (weights in --config's loss: block).

    Example: kdcache train --stage dft --student runs/s-sft --data data/instruct_small.json --images data/images
             --cache caches/t.zarr --out runs/s-dft --batch-size 32 --epochs 6 --lr 1e-3
    """
    from .config import TrainConfig, from_dict
    from .train import train as _train

    flags = dict(stage=stage, student=student, data=str(data), images=str(images), out=str(out),
                 cache=cache, teacher=teacher, epochs=epochs, max_steps=max_steps,
                 batch_size=batch_size, grad_accum=grad_accum, lr=lr, seed=seed, template=template,
                 max_length=max_length, on_too_long=on_too_long, gradient_checkpointing=gradient_checkpointing,
                 num_workers=num_workers, save_every=save_every, log_every=log_every, on_nan=on_nan, dist_timeout_s=dist_timeout_s,
                 cache_dir=cache_dir)
    try:
        base = {}
        if config is not None:
            import yaml

            base = yaml.safe_load(config.read_text()) or {}
        base.update({k: v for k, v in flags.items() if v is not None})
        if storage_option:  # flags win key by key over the YAML's storage_options
            from .cache.store import merged_options, parse_storage_options

            base["storage_options"] = merged_options(base.get("storage_options"), parse_storage_options(storage_option))
        cfg = from_dict(TrainConfig, base)
        _train(cfg)
    except _user_errors() as e:
        _fail(e)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="A pipelines/*.yaml recipe."),
    workdir: Optional[Path] = typer.Option(None, help="Where runs and caches go (default: the recipe's)."),
    dry_run: bool = typer.Option(False, help="Print the stages and exit."),
    set_: list[str] = typer.Option([], "--set", help="Override KEY=VALUE (repeatable; VALUE is YAML): "
                                                     "defaults.max_steps=2, dump_defaults.top_k=16, or "
                                                     "steps.NAME.KEY=VALUE for the step called NAME "
                                                     "(steps.data.num_images=40); required recipes get them too."),
):
    """Run a whole multi-stage recipe, skipping steps done with the same settings and inputs.

    Every input is checked before the first step; a step's output made with other settings is
    refused, naming what changed (stamps in WORKDIR/.steps/).

    Example: kdcache run pipelines/llava_kd.yaml

    Example: kdcache run pipelines/llava_kd.yaml --workdir runs/llava_kd_short --set defaults.max_steps=20
    """
    from .config import ConfigError
    from .recipes import run_recipe

    try:
        overrides = {}
        for item in set_:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set defaults.max_steps=2")
            import yaml

            overrides[key.strip()] = yaml.safe_load(value)
        run_recipe(recipe, workdir=workdir, dry_run=dry_run, overrides=overrides)
    except _user_errors() as e:
        _fail(e)


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="Model directory or hub id."),
    data: Path = typer.Option(..., help="LLaVA JSON with reference answers (gpt turns; question_type)."),
    images: Path = typer.Option(..., help="Image root directory."),
    out: Optional[Path] = typer.Option(None, help="JSON report path."),
    teacher_cache: Optional[str] = typer.Option(None, help="Cache of the same data (directory or URL): agreement "
                                                           "and KL."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model: agreement and KL, online."),
    batch_size: int = typer.Option(16, help="Generation batch size."),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N samples only."),
    template: str = typer.Option("chat", help="chat | qwen2_base | pretrain"),
    max_new_tokens: int = typer.Option(8, help="Longest generated answer."),
    max_length: int = typer.Option(2048, help="Longest prompt in tokens (longer samples are skipped)."),
    storage_option: Optional[list[str]] = _STORAGE,
):
    """Answer each question by greedy generation and score it per question type.

    Example: kdcache eval --model runs/s-dft --data data/eval.json --images data/images --out eval.json
    """
    from .config import EvalConfig
    from .evaluate import evaluate, format_report

    cfg = EvalConfig(model=model, data=str(data), images=str(images), out=str(out) if out else None,
                     teacher_cache=teacher_cache, teacher=teacher,
                     batch_size=batch_size, limit=limit, template=template, max_new_tokens=max_new_tokens,
                     max_length=max_length,
                     storage_options=_cache_arg(teacher_cache, storage_option).storage_options if teacher_cache else {})
    try:
        typer.echo(format_report(evaluate(cfg)))
    except (ValueError, *_user_errors()) as e:
        _fail(e)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Artefacts directory."),
    quick: bool = typer.Option(False, help="Smoke test: every stage at toy sizes (~2-3 min on a 2-core CPU); prints no accuracy table."),
    seeds: Optional[int] = typer.Option(None, help="Student seeds (default 3; --quick 1)."),
):
    """Distil a tiny teacher into a tiny student on the synthetic task, against plain training with the
    same steps and with the same wall time, over 3 seeds (target: 12 minutes on 2 CPU cores).

    Prints one table (accuracy per question type, paired gains, the share of the teacher-baseline
    gap closed) and writes report.json and PNG figures under --out.

    Example: kdcache demo --quick
    """
    from .demo import run_demo

    run_demo(out, quick=quick, seeds=seeds)


if __name__ == "__main__":
    sys.exit(app())
