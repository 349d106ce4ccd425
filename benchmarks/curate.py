"""Throughput of ``crfiqa curate`` (Ray Data) next to ``crfiqa score`` (one process) on the same images, in one
run; prints a table with the ratio (goal: curate >= 0.85x score on this machine, i.e. the engine's overhead).

    python benchmarks/curate.py --images 256 --models-dir ../shared/models

Measured: the score loop with its models loaded (``Pipeline.run``, what ``crfiqa score`` runs) against a curate
job on an already started local Ray (cold: first job, workers start and open their models; warm: a second job
on the same Ray, workers reused), and both commands end to end as subprocesses (start-up, Ray start, writing).
Per-stage seconds per image come from curate's own timings (summed over workers)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def score_loop(paths: list[Path], settings) -> float:
    """Images/s of ``Pipeline.run`` over ``paths`` with the models already loaded."""
    from crfiqa.service.pipeline import Pipeline

    pipe = Pipeline(settings)  # crfiqa score's own settings: the defaults of Settings, unchanged
    pipe.load()
    list(pipe.run(paths[:4]))  # warm-up
    t = time.perf_counter()
    n = sum(1 for _ in pipe.run(paths))
    return n / (time.perf_counter() - t)


def curate_job(src: Path, dst: Path, settings, batch_size: int, **kw) -> tuple[float, dict]:
    """(images/s of one curate job on the running Ray, its per-stage seconds)."""
    from crfiqa.curation.curate import CurateConfig, curate

    shutil.rmtree(dst, ignore_errors=True)
    summary = curate(CurateConfig(src, dst, settings, batch_size=batch_size, report=False, shard_size=256, **kw))
    return summary.images / summary.seconds, summary.stages


def per_image_ms(stages: dict) -> dict[str, float]:
    """Stage milliseconds per image from summed stage seconds."""
    n = stages.get("images", 1)
    return {k.removeprefix("t_"): 1000 * v / n for k, v in stages.items() if k != "images"}


def cpu_costs(paths: list[Path], settings, n: int = 48) -> dict[str, float]:
    """CPU milliseconds per image of each stage on one thread (``thread_time``, so other processes on the
    machine inflate it far less than wall time): the costs docs/scale.md builds its throughput model on."""
    from crfiqa.service.align import align_face
    from crfiqa.service.pipeline import Pipeline

    pipe = Pipeline(replace(settings, intra_op_threads=1))  # one ORT thread: it runs on the calling thread
    pipe.load()
    sample = paths[:n]
    pipe.score(np.stack([align_face(pipe.decode(sample[0]).rgb, d.landmarks)
                         for d in pipe.detect(pipe.decode(sample[0]).rgb)][:1]))  # warm-up
    costs = dict.fromkeys(("decode", "detect", "align", "score"), 0.0)
    faces = 0
    for p in sample:
        t = time.thread_time()
        image = pipe.decode(p)
        t1 = time.thread_time()
        dets = pipe.detect(image.rgb)
        t2 = time.thread_time()
        crops = np.stack([align_face(image.rgb, d.landmarks) for d in dets]) if dets else None
        t3 = time.thread_time()
        if crops is not None:
            pipe.score(crops)
            faces += len(crops)
        t4 = time.thread_time()
        for k, v in zip(costs, (t1 - t, t2 - t1, t3 - t2, t4 - t3)):
            costs[k] += v
    out = {k: 1000 * v / len(sample) for k, v in costs.items()}
    out["faces_per_image"] = faces / len(sample)
    return out


def command(argv: list[str], env: dict) -> float:
    """Wall seconds of a ``crfiqa`` command run as a subprocess."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crfiqa.cli", *argv], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="alternate score and curate this many times; best each")
    ap.add_argument("--no-commands", action="store_true", help="skip the end-to-end subprocess runs")
    ap.add_argument("--rec", type=Path, default=REPO.parent / "shared" / "data" / "fixtures" / "train.rec",
                    help="an aligned InsightFace RecordIO for the --aligned stage costs (skipped if absent)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import ray

    from crfiqa.curation.curate import LOCAL_OBJECT_STORE
    from crfiqa.service.imaging import list_images
    from crfiqa.service.settings import Settings

    paths = list_images([args.data])[: args.images]
    env = {**os.environ, "CRFIQA_MODELS_DIR": str(args.models_dir), "CRFIQA_PROVIDERS": args.providers}
    settings = Settings(models_dir=args.models_dir, providers=args.providers,
                        max_batch_size=args.batch_size).pipeline_settings()
    work = Path(tempfile.mkdtemp(prefix="crfiqa-bench-curate-"))
    src = work / "images.txt"
    src.write_text("".join(f"{p.resolve()}\n" for p in paths))
    out: dict = {"images": len(paths), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "load_avg_start": os.getloadavg()[0]}
    try:
        out["cpu_ms_per_image"] = cpu_costs(paths, settings)
        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE,
                 configure_logging=False, log_to_driver=False)
        out["ray_start_s"] = time.perf_counter() - t
        score, cold, warm, stages = [], None, [], {}
        for k in range(args.repeat):
            score.append(score_loop(paths, settings))
            rate, stages = curate_job(src, work / f"dst{k}", settings, args.batch_size)
            if cold is None:
                cold = rate
            else:
                warm.append(rate)
        out["stage_ms_per_image"] = per_image_ms(stages)
        if args.rec.is_file():  # an aligned dataset: no detection, so decode and the model are what is left
            from crfiqa.service.pipeline import Options

            rate, rec_stages = curate_job(args.rec, work / "rec", settings, args.batch_size,
                                          options=Options(aligned=True))
            out["aligned_rec_img_s"], out["aligned_stage_ms_per_image"] = rate, per_image_ms(rec_stages)
        ray.shutdown()
        out.update(score_img_s=max(score), curate_cold_img_s=cold, curate_warm_img_s=max(warm or [cold]))
        if not args.no_commands:
            names = [str(p) for p in paths]
            out["score_cmd_s"] = command(["score", *names, "--out", str(work / "s.csv"), "--quiet"], env)
            out["curate_cmd_s"] = command(["curate", str(src), "--out", str(work / "cmd"), "--no-report",
                                           "--batch-size", str(args.batch_size)], env)
        out["load_avg_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = out["curate_warm_img_s"] / out["score_img_s"]
    print(f"\ncurate benchmark: {out['images']} LFW images, {out['machine']}, {args.providers}, batch "
          f"{args.batch_size}, load average {out['load_avg_start']:.1f} -> {out['load_avg_end']:.1f}")
    print(f"{'run':<52}{'img/s':>10}{'vs score':>10}")
    print(f"{'crfiqa score loop (Pipeline.run, models loaded)':<52}{out['score_img_s']:>10.2f}{1.0:>10.2f}")
    print(f"{'crfiqa curate job, warm workers (Ray up)':<52}{out['curate_warm_img_s']:>10.2f}{ratio:>10.2f}")
    print(f"{'crfiqa curate job, cold (workers start, load models)':<52}{out['curate_cold_img_s']:>10.2f}"
          f"{out['curate_cold_img_s'] / out['score_img_s']:>10.2f}")
    if "score_cmd_s" in out:
        n = out["images"]
        print(f"{'crfiqa score command end to end':<52}{n / out['score_cmd_s']:>10.2f}{1.0:>10.2f}")
        print(f"{'crfiqa curate command end to end (starts Ray)':<52}{n / out['curate_cmd_s']:>10.2f}"
              f"{out['score_cmd_s'] / out['curate_cmd_s']:>10.2f}")
    print(f"local Ray start: {out['ray_start_s']:.1f} s")
    print("CPU ms per image, one thread (thread_time): "
          + ", ".join(f"{k} {v:.2f}" for k, v in out["cpu_ms_per_image"].items()))
    print("curate stage time, ms per image (summed over workers): "
          + ", ".join(f"{k} {v:.1f}" for k, v in out["stage_ms_per_image"].items()))
    if "aligned_rec_img_s" in out:
        print(f"aligned RecordIO (--aligned, {args.rec.name}): {out['aligned_rec_img_s']:.2f} img/s; ms per image: "
              + ", ".join(f"{k} {v:.1f}" for k, v in out["aligned_stage_ms_per_image"].items()))
    print(f"goal curate >= 0.85x score (warm): {'met' if ratio >= 0.85 else 'NOT met'} ({ratio:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
