"""Fidelity of the cache's target modes: what top-k, sampled and exact targets cost and what they buy.

    python bench/fidelity.py --demo-dir demo_out                     # part 1 on the demo's teacher
    python bench/fidelity.py --demo-dir demo_out --accuracy --seeds 3  # + part 2 (~25 min on CPU)

``--demo-dir`` is the output directory of a finished ``kdcache demo`` (it holds the trained teacher,
the students of every seed and the data); ``--teacher/--student/--data/--images`` override the
pieces for part 1.

Part 1, on held-out samples (the first ``--limit`` of the eval split), for each mode
(``topk:8``, ``topk:64``, ``topp:0.99``, ``topp:0.999`` (nucleus capped at K = 256),
``sampled:8``, ``sampled:64``, ``hidden``), each dumped by the real
``kdcache dump`` with its default storage dtypes (float16 log-probs, bf16 hidden states):

* ``KL(stored||exact)``: mean over positions of KL(q || p), p the teacher's exact distribution
  (float32, online), q what the cache lets a loss see as the teacher: top-k renormalised over
  its k ids (= -log of the kept mass; topp: the kept nucleus), the empirical distribution c/N of the sampled mode, the
  distribution rebuilt from bf16 hidden states and the stored LM head in the exact mode;
* ``L_res err`` / ``L_vis err``: |L_mode - L_online| / L_online of the batch-mean forward KL at
  response / visual positions for a real student (the demo's PT-SFT student), L_online being
  online KD against the full teacher distribution; top-k uses the trainer's default (k ids +
  tail bucket), sampled the unbiased estimator ``sum_j c_j/N (log p_j - log s_j)``;
* ``grad err``: ||g_mode - g_online|| / ||g_online|| of d(L_res + L_vis)/d(student logits);
* ``B/pos``: bytes on disk of the target arrays per distilled position (ids, log-probs, tail,
  counts; the exact mode's position hidden states; topp's ragged arrays and their index
  columns), and the exact mode's one-off LM head.

Part 2 (``--accuracy``): from each seed's DPT-SFT student of the demo, the DFT stage is run on
the student split's cache of each mode (everything else as the demo's LLaVA-KD row), and the
students are scored on the held-out eval split: mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MODES = ("topk:8", "topk:64", "topp:0.99", "topp:0.999", "sampled:8", "sampled:64", "hidden")
TOPP_K = 256  # the nucleus modes' cap K (topp:P,256): a flat position may keep more than top-64


def _dump_kwargs(mode: str) -> dict:
    if mode.startswith("topk:"):
        return {"top_k": int(mode.split(":")[1]), "targets": "topk"}
    if mode.startswith("topp:"):
        return {"targets": mode, "top_k": TOPP_K}
    if mode.startswith("sampled:"):
        return {"targets": mode, "draw_seed": 0}
    return {"targets": "hidden", "top_k": 8}


def find_demo(demo_dir: Path) -> dict:
    """The demo's teacher, students (per seed), data and images from its report.json; ``config`` is
    the settings its LLaVA-KD DFT step ran with (that run's train_config.json)."""
    report = json.loads((demo_dir / "report.json").read_text())
    art = report["artefacts"]
    teacher = Path(art["teacher"])
    seeds = art["students"]["LLaVA-KD"]
    data = Path(art["out"]) / "data"
    dft = json.loads((Path(next(iter(seeds.values()))) / "train_config.json").read_text())
    return {"teacher": teacher, "baseline": {int(s): Path(p) for s, p in art["students"]["baseline PT-SFT"].items()},
            "dpt_sft": {int(s): Path(p).parent / "dpt_sft" for s, p in seeds.items()}, "data": data,
            "images": data / "images", "config": dft}


def dump_mode(mode: str, teacher: Path, data: Path, images: Path, out: Path, positions=("visual", "response")) -> Path:
    from kdcache.config import DumpConfig
    from kdcache.dump import dump

    cfg = DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out), positions=positions,
                     batch_size=32, num_workers=1, **_dump_kwargs(mode))
    dump(cfg)
    return out


def target_bytes(cache: Path) -> tuple[float, float]:
    """(bytes per distilled position of the target arrays, one-off bytes of the LM head)."""
    from kdcache.cache.reader import CacheReader
    from kdcache.cache.stats import disk_bytes

    b = disk_bytes(cache)
    P = sum(int(p.length("positions").sum()) for p in CacheReader(cache).parts.values())
    per_pos = sum(b.get(a, 0) for a in ("topk_ids", "topk_logprobs", "tail_logmass", "sample_counts",
                                       "position_hidden", "topp_counts", "topp_ids", "topp_logprobs",
                                       "index/entry_offset", "index/num_entries"))
    lm = sum(f.stat().st_size for f in (cache / "teacher_lm_head").rglob("*") if f.is_file()) \
        if (cache / "teacher_lm_head").is_dir() else 0
    return per_pos / P, float(lm)


@torch.no_grad()
def _forward_logits(model, batch, records) -> torch.Tensor:
    """Logits [P, V] (float32) at every record's distilled positions, in record order."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(model.dtype),
                      use_cache=False)
    h = torch.cat([out.last_hidden_state[b, r.positions.long()] for b, r in enumerate(records)])  # [P, D]
    return (h @ model.lm_head.weight.T).float()


def mode_losses(mode: str, z_s: torch.Tensor, recs, lm_head) -> torch.Tensor:
    """Per-position forward KL [P] of the student logits against the mode's cached targets."""
    from kdcache import losses as L

    cat = {f: torch.cat([getattr(r, f) for r in recs]) for f in ("topk_ids", "topk_logprobs", "tail_logmass")}
    if mode.startswith(("topk:", "topp:")):  # topp: records padded to K, the kept columns finite
        lp = cat["topk_logprobs"].float()
        return L.topk_divergence(z_s, cat["topk_ids"].long(), lp, cat["tail_logmass"].float(),
                                 topk_mask=torch.isfinite(lp) if mode.startswith("topp:") else None)
    if mode.startswith("sampled:"):
        counts = torch.cat([r.sample_counts for r in recs]).long()
        return L.sampled_kl(z_s, cat["topk_ids"].long(), counts, cat["topk_logprobs"].float())
    h_t = torch.cat([r.position_hidden for r in recs]).float()  # [P, D_t]
    return L.full_divergence(z_s, h_t @ lm_head.float().T)


def stored_vs_exact_kl(mode: str, recs, lp_exact: torch.Tensor, lm_head) -> torch.Tensor:
    """KL(q || p) per position [P]: q the teacher as the cache gives it, p the exact teacher."""
    ids = torch.cat([r.topk_ids for r in recs]).long()
    if mode.startswith(("topk:", "topp:")):
        kept_cols = torch.isfinite(torch.cat([r.topk_logprobs for r in recs]).float())  # topp: padding False
        kept = torch.logsumexp(lp_exact.gather(1, ids).masked_fill(~kept_cols, float("-inf")), dim=1)
        return -kept  # log of the kept mass
    if mode.startswith("sampled:"):
        counts = torch.cat([r.sample_counts for r in recs]).double()
        q = counts / counts.sum(1, keepdim=True)
        lq = torch.where(q > 0, q.log(), 0.0)
        return (q * (lq - lp_exact.gather(1, ids).double())).sum(1).float()
    h_t = torch.cat([r.position_hidden for r in recs]).float()
    lq = torch.log_softmax(h_t @ lm_head.float().T, dim=-1)
    return (lq.exp() * (lq - lp_exact)).sum(1)


def part1(args, pieces: dict, work: Path) -> list[dict]:
    from kdcache import losses as L
    from kdcache.cache.reader import CacheReader
    from kdcache.data.collate import LlavaTorchDataset, collate, prepare_samples
    from kdcache.data.llava import read_llava_json
    from kdcache.models import image_token_id, load_model, num_image_tokens
    from kdcache.positions import KIND_RESPONSE, KIND_VISUAL
    from kdcache.teacher import teacher_records

    held = work / "heldout.json"
    held.write_text(json.dumps(json.loads(Path(args.data or pieces["data"] / "eval.json").read_text())[: args.limit]))
    teacher_dir = args.teacher or pieces["teacher"]
    student_dir = args.student or pieces["baseline"][0]
    images = args.images or pieces["images"]
    teacher, proc = load_model(str(teacher_dir), dtype=torch.float32, device="cpu")
    student, _ = load_model(str(student_dir), dtype=torch.float32, device="cpu")
    V = int(teacher.lm_head.weight.shape[0])

    caches = {m: dump_mode(m, teacher_dir, held, images, work / f"{m.replace(':', '')}.zarr") for m in args.modes}
    readers = {m: CacheReader(c) for m, c in caches.items()}
    recs = {m: sorted(r.read_range(0, 0, r.part_sizes[0]), key=lambda x: x.row) for m, r in readers.items()}
    lm_heads = {m: r.lm_head() for m, r in readers.items() if m == "hidden"}

    kept, toks, _ = prepare_samples(read_llava_json(held), proc.tokenizer, images_root=images, template="chat",
                                    image_token_id=image_token_id(teacher.config),
                                    num_image_tokens=num_image_tokens(teacher.config, proc), max_length=2048,
                                    on_too_long="skip")
    ds = LlavaTorchDataset.from_prepared(kept, toks, proc.image_processor, images)
    index_of = {k.row: j for j, k in enumerate(kept)}
    stats = {m: {"kl": [], "vis": [], "res": [], "grad": [], "n": 0} for m in args.modes}
    ref_rows = [r.row for r in recs[args.modes[0]]]
    for s in range(0, len(ref_rows), args.batch_size):
        rows = ref_rows[s:s + args.batch_size]
        items = [ds[index_of[row]] for row in rows]
        batch = collate(items, proc.tokenizer.pad_token_id)
        online = teacher_records(teacher, batch, kinds=("visual", "response"), top_k=V)  # the reference
        lp_exact = torch.cat([torch.full((len(r.positions), V), float("-inf")).scatter(1, r.topk_ids.long(),
                                                                                      r.topk_logprobs.float())
                              for r in online])  # [P, V] exact teacher log-probs
        kinds = torch.cat([r.kinds for r in online]).long()
        z = _forward_logits(student, batch, online).requires_grad_(True)  # [P, V]

        def terms(per_pos):
            res = L.masked_mean(per_pos, kinds == KIND_RESPONSE)
            vis = L.masked_mean(per_pos, kinds == KIND_VISUAL)
            g, = torch.autograd.grad(res + vis, z)
            return res.item(), vis.item(), g

        ref = terms(L.full_divergence(z, lp_exact))
        for m in args.modes:
            batch_recs = [next(r for r in recs[m] if r.row == row) for row in rows]
            got = terms(mode_losses(m, z, batch_recs, lm_heads.get(m)))
            st = stats[m]
            st["kl"].append(stored_vs_exact_kl(m, batch_recs, lp_exact, lm_heads.get(m)).mean().item())
            st["res"].append(abs(got[0] - ref[0]) / ref[0])
            st["vis"].append(abs(got[1] - ref[1]) / ref[1])
            st["grad"].append((got[2] - ref[2]).norm().item() / ref[2].norm().item())
    rows_out = []
    for m in args.modes:
        per_pos, lm = target_bytes(caches[m])
        st = stats[m]
        rows_out.append({"mode": m, "kl": statistics.mean(st["kl"]), "res_err": statistics.mean(st["res"]),
                         "vis_err": statistics.mean(st["vis"]), "grad_err": statistics.mean(st["grad"]),
                         "bytes_per_pos": per_pos, "lm_head_bytes": lm})
    head = (f"{'mode':<11}{'KL(stored||exact)':>18}{'L_res err':>11}{'L_vis err':>11}{'grad err':>10}"
            f"{'B/pos':>8}{'LM head':>10}")
    print(f"\nPart 1: {len(ref_rows)} held-out samples, teacher {teacher_dir}, student {student_dir}, vocab {V}")
    print(head + "\n" + "-" * len(head))
    for r in rows_out:
        lm = f"{r['lm_head_bytes'] / 2**20:>8.2f}MB" if r["lm_head_bytes"] else f"{'-':>10}"
        print(f"{r['mode']:<11}{r['kl']:>18.2e}{100 * r['res_err']:>10.2f}%{100 * r['vis_err']:>10.2f}%"
              f"{100 * r['grad_err']:>9.1f}%{r['bytes_per_pos']:>8.0f}{lm}")
    return rows_out


def part2(args, pieces: dict, work: Path) -> dict:
    """DFT per mode and seed from the demo's DPT-SFT students; held-out accuracy."""
    from kdcache.config import EvalConfig, LossConfig, TrainConfig
    from kdcache.evaluate import evaluate
    from kdcache.train import train

    cfg = pieces["config"]
    data, images = pieces["data"], pieces["images"]
    loss = LossConfig(**cfg["loss"])
    acc: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    for m in args.modes:
        cache = dump_mode(m, pieces["teacher"], data / "instruct_small.json", images,
                          work / "train_caches" / f"{m.replace(':', '')}.zarr")
        for seed in range(args.seeds):
            out = work / "students" / m.replace(":", "") / f"seed{seed}"
            t0 = time.perf_counter()
            if not (out / "DONE").is_file():
                train(TrainConfig(stage="dft", student=str(pieces["dpt_sft"][seed]), data=str(data / "instruct_small.json"),
                                  images=str(images), out=str(out), cache=str(cache), epochs=cfg["epochs"],
                                  lr=cfg["lr"], seed=seed + 100, batch_size=cfg["batch_size"], num_workers=1,
                                  log_every=5, warmup_ratio=0.03, loss=loss))
            walls.setdefault(m, []).append(time.perf_counter() - t0)
            r = evaluate(EvalConfig(model=str(out), data=str(data / "eval.json"), images=str(images), batch_size=256))
            acc.setdefault(m, []).append(r["accuracy_micro"])
    head = f"{'mode':<11}{'accuracy':>16}{'per seed':>22}"
    print(f"\nPart 2: DFT from the demo's DPT-SFT students, {args.seeds} seeds, held-out eval")
    print(head + "\n" + "-" * len(head))
    for m in args.modes:
        a = acc[m]
        sd = statistics.pstdev(a) if len(a) > 1 else 0.0
        print(f"{m:<11}{100 * statistics.mean(a):>9.1f} ±{100 * sd:>4.1f}{', '.join(f'{100 * x:.1f}' for x in a):>22}")
    return {"accuracy": acc, "dft_wall_s": walls}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", type=Path, required=True, help="output directory of a finished `kdcache demo`")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--student", default=None, help="student whose gradients are compared (default: PT-SFT seed 0)")
    ap.add_argument("--data", default=None, help="held-out LLaVA JSON (default: the demo's eval split)")
    ap.add_argument("--images", default=None)
    ap.add_argument("--limit", type=int, default=64, help="held-out samples for part 1")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--accuracy", action="store_true", help="also run part 2 (DFT per mode and seed)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="where caches and students go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.modes = tuple(args.modes.split(","))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pieces = find_demo(args.demo_dir)
    work = args.work or Path(tempfile.mkdtemp(prefix="kdcache-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"part1": part1(args, pieces, work)}
    if args.accuracy:
        result["part2"] = part2(args, pieces, work)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\ncaches and students under {work}")


if __name__ == "__main__":
    main()
