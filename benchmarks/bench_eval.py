"""Speed and memory of `utils.eval_reid.evaluate` against the reference path.

Reference path (what the original does, from features): L2-normalise, the full (Q, G)
squared-Euclidean matrix with torch on the CPU, then `eval_func` (stable argsort of every
row and a per-query Python loop). Centroid reference: per-identity means with numpy, the
query's own centroid rebuilt without its camera, the full matrix, then a per-query loop.

Features are random but clustered: one centre per identity plus a per-camera offset and
per-image noise (float32, 2048-d), with some distractors (pid 0).

Peak extra host memory is measured in a fresh child process: after the features exist,
the kernel's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`), and the peak
(VmHWM) after `evaluate` minus the RSS before it is reported. (tracemalloc cannot see
torch's allocations; where clear_refs is not allowed, the ru_maxrss delta is used.)

    python benchmarks/bench_eval.py --scale market --device cpu --out market_cpu.json
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine_info, sync, write_report  # noqa: E402
from utils.eval_reid import eval_func, evaluate, format_metrics, pairwise_distance  # noqa: E402

SCALES = {  # Market-1501 and MSMT17 test-set sizes
    "small": dict(num_query=300, num_gallery=1500, num_ids=100, num_distractors=150,
                  num_cameras=6),
    "market": dict(num_query=3368, num_gallery=15913, num_ids=750, num_distractors=2793,
                   num_cameras=6),
    "msmt": dict(num_query=11659, num_gallery=82161, num_ids=3060, num_distractors=0,
                 num_cameras=15),
}
DIM, NOISE, CAMERA_SHIFT = 2048, 2.2, 0.7  # chosen so standard-mode mAP is ~0.8, not 0 or 1


def make_data(scale, seed):
    """(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids); features float32 (N, 2048)."""
    cfg = SCALES[scale]
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((cfg["num_ids"] + 1, DIM), dtype=np.float32)
    shifts = CAMERA_SHIFT * rng.standard_normal((cfg["num_cameras"], DIM), dtype=np.float32)
    num_real = cfg["num_gallery"] - cfg["num_distractors"]
    g_pids = np.concatenate([rng.integers(1, cfg["num_ids"] + 1, num_real),
                             np.zeros(cfg["num_distractors"], np.int64)])
    q_pids = rng.integers(1, cfg["num_ids"] + 1, cfg["num_query"])
    q_camids = rng.integers(0, cfg["num_cameras"], cfg["num_query"])
    g_camids = rng.integers(0, cfg["num_cameras"], cfg["num_gallery"])

    def features(pids, camids):
        out = np.empty((len(pids), DIM), np.float32)
        for i in range(0, len(pids), 4096):  # in blocks: no full-size temporaries
            rows = slice(i, i + 4096)
            out[rows] = rng.standard_normal((len(pids[rows]), DIM), dtype=np.float32)
            out[rows] *= NOISE
            # Distractors get a random centre of their own.
            centre = np.where((pids[rows] > 0)[:, None], centres[pids[rows]],
                              rng.standard_normal((len(pids[rows]), DIM), dtype=np.float32))
            out[rows] += centre + shifts[camids[rows]]
        return out
    return (features(q_pids, q_camids), features(g_pids, g_camids),
            q_pids, g_pids, q_camids, g_camids)


def original_distance(q_feats, g_feats):
    """The original's distance: normalise, ‖q‖² + ‖g‖² − 2 q·g via addmm, on the CPU."""
    q = torch.nn.functional.normalize(torch.from_numpy(q_feats), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(g_feats), dim=1)
    distmat = (q.pow(2).sum(dim=1, keepdim=True).expand(len(q), len(g))
               + g.pow(2).sum(dim=1, keepdim=True).expand(len(g), len(q)).t())
    return distmat.addmm_(q, g.t(), beta=1, alpha=-2).numpy()


def reference_standard(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids):
    start = time.perf_counter()
    distmat = original_distance(q_feats, g_feats)
    middle = time.perf_counter()
    cmc, mAP = eval_func(distmat, q_pids, g_pids, q_camids, g_camids)
    end = time.perf_counter()
    return {"seconds": end - start, "distance_seconds": middle - start,
            "eval_func_seconds": end - middle, "mAP": mAP, "cmc": cmc}


def reference_centroid(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Camera-aware centroid evaluation, the obvious way (numpy means, per-query loop)."""
    start = time.perf_counter()
    ids = np.unique(g_pids[g_pids > 0])
    singles = np.flatnonzero(g_pids <= 0)
    items = np.concatenate([np.stack([g_feats[g_pids == p].mean(axis=0) for p in ids]),
                            g_feats[singles]]).astype(np.float32)
    item_pids = np.concatenate([ids, g_pids[singles]])
    own = {}  # (pid, camera) -> the pid's centroid without that camera, or None
    for pid, cam in set(zip(q_pids.tolist(), q_camids.tolist())):
        rows = (g_pids == pid) & (g_camids != cam)
        own[pid, cam] = g_feats[rows].mean(axis=0) if rows.any() else None
    distmat = original_distance(q_feats, items)
    aps, inps, cmcs = [], [], []
    for i in range(len(q_feats)):
        row, keep = distmat[i].copy(), np.ones(len(items), bool)
        col = np.searchsorted(ids, q_pids[i])
        if col < len(ids) and ids[col] == q_pids[i]:
            centroid = own[q_pids[i], q_camids[i]]
            if centroid is None:
                keep[col] = False
            else:
                q = q_feats[i] / np.linalg.norm(q_feats[i])
                row[col] = np.sum((q - centroid / np.linalg.norm(centroid)) ** 2)
        order = np.argsort(row, kind="stable")
        hits = item_pids[order[keep[order]]] == q_pids[i]
        if hits.any():
            positions = np.flatnonzero(hits) + 1
            aps.append(np.mean(np.arange(1, len(positions) + 1) / positions))
            inps.append(len(positions) / positions[-1])
            cmcs.append(np.arange(1, max_rank + 1) >= positions[0])
    return {"seconds": time.perf_counter() - start, "mAP": float(np.mean(aps)),
            "mINP": float(np.mean(inps)), "cmc": np.mean(cmcs, axis=0)}


def timed_evaluate(data, device, **kwargs):
    q_feats, g_feats, *labels = data
    q, g = torch.from_numpy(q_feats).to(device), torch.from_numpy(g_feats).to(device)
    sync(device)
    start = time.perf_counter()
    result = evaluate(q, g, *labels, **kwargs)  # returns host values: the device work is done
    result["seconds"] = time.perf_counter() - start
    return result


def _read_status(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes


def warm_up(device: str) -> None:
    """Create the CUDA context and load cuBLAS / cuSPARSE before anything is measured: they are
    one-off costs of the process (hundreds of MB of host memory), not of `evaluate`."""
    if device == "cuda":
        a = torch.ones(64, 64, device=device)
        (a @ a).sum().item()
        torch.sparse.mm(a.to_sparse(), a).sum().item()
        evaluate(torch.randn(8, 16, device=device), torch.randn(32, 16, device=device),
                 np.arange(8) % 4 + 1, np.arange(32) % 4 + 1, np.zeros(8, int), np.ones(32, int))
        sync(device)


def child_main(args):
    """Fresh process: time `evaluate` and measure its peak extra host memory per mode."""
    warm_up(args.device)
    data = make_data(args.scale, args.seed)
    report = {}
    modes = [("standard", {}), ("centroid", {"use_centroids": True})]
    if args.rerank:
        modes.append(("standard_reranked", {"rerank": True}))
    for mode, options in modes:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current RSS
            method, before = "VmHWM after clear_refs", _read_status("VmRSS")
        except OSError:
            method = "ru_maxrss delta"
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = timed_evaluate(data, args.device, **options)
        peak = (_read_status("VmHWM") if method.startswith("VmHWM")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        report[mode] = {"seconds": result["seconds"], "peak_extra_host_bytes": peak - before,
                        "memory_method": method, "metrics": format_metrics(result)}
        if args.device == "cuda":
            report[mode]["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(report))


def run_child(args):
    command = [sys.executable, os.path.abspath(__file__), "--child", "--scale", args.scale,
               "--device", args.device, "--seed", str(args.seed)] + ["--rerank"] * args.rerank
    # stdout only: the child's errors (an OOM, a CUDA error) reach the terminal.
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def max_abs_diff(a, b):
    return float(max(abs(a["mAP"] - b["mAP"]), np.abs(np.asarray(a["cmc"]) - b["cmc"]).max()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="market")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timings: best of this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--rerank", action="store_true",
                        help="also time evaluate(rerank=True) in the fresh process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)

    report = {"scale": args.scale, "sizes": SCALES[args.scale], "dim": DIM,
              "device": args.device, "repeats": args.repeats, "machine": machine_info(args.device),
              "load_average_before": os.getloadavg()}
    with_reference = args.scale != "msmt"  # the reference needs ~8 GB and many minutes there
    if with_reference:
        warm_up(args.device)
        data = make_data(args.scale, args.seed)
        runs = {"reference_standard": [], "evaluate_standard": [], "gemm_only": [],
                "reference_centroid": [], "evaluate_centroid": []}
        for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
            runs["reference_standard"].append(reference_standard(*data))
            runs["evaluate_standard"].append(timed_evaluate(data, args.device))
            q, g = (torch.from_numpy(x).to(args.device) for x in data[:2])
            sync(args.device)
            start = time.perf_counter()
            pairwise_distance(q, g, feat_norm=True)
            sync(args.device)
            runs["gemm_only"].append({"seconds": time.perf_counter() - start})
            del q, g
            runs["reference_centroid"].append(reference_centroid(*data))
            runs["evaluate_centroid"].append(timed_evaluate(data, args.device, use_centroids=True))
        best = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
        for mode in ("standard", "centroid"):
            ref, ours = best[f"reference_{mode}"], best[f"evaluate_{mode}"]
            report[mode] = {
                "reference_seconds": ref["seconds"], "evaluate_seconds": ours["seconds"],
                "speedup": ref["seconds"] / ours["seconds"],
                "reference_metrics": {"mAP": float(ref["mAP"]), "rank1": float(ref["cmc"][0]),
                                      **({"mINP": ref["mINP"]} if "mINP" in ref else {})},
                "evaluate_metrics": format_metrics(ours),
                "max_abs_diff_mAP_cmc": max_abs_diff(ref, ours)}
        report["standard"].update(
            reference_distance_seconds=best["reference_standard"]["distance_seconds"],
            reference_eval_func_seconds=best["reference_standard"]["eval_func_seconds"],
            evaluate_distance_only_seconds=best["gemm_only"]["seconds"])
        report["all_seconds"] = {name: [x["seconds"] for x in r] for name, r in runs.items()}
        del data
    report["fresh_process"] = run_child(args)
    report["load_average_after"] = os.getloadavg()
    print_table(report, with_reference)
    if args.out:
        write_report(args.out, report)


def print_table(report, with_reference):
    print(f"scale {report['scale']} {report['sizes']} on {report['device']}, "
          f"{report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']}, "
          f"load {report['load_average_before'][0]:.1f}")
    if with_reference:
        print(f"{'mode':9} {'reference s':>11} {'evaluate s':>10} {'speed-up':>8} "
              f"{'ref mAP':>8} {'eval mAP':>8} {'eval mINP':>9} {'max |diff|':>10}")
        for mode in ("standard", "centroid"):
            r = report[mode]
            print(f"{mode:9} {r['reference_seconds']:11.2f} {r['evaluate_seconds']:10.2f} "
                  f"{r['speedup']:8.2f} {r['reference_metrics']['mAP']:8.4f} "
                  f"{r['evaluate_metrics']['mAP']:8.4f} {r['evaluate_metrics']['mINP']:9.4f} "
                  f"{r['max_abs_diff_mAP_cmc']:10.2e}")
        s = report["standard"]
        print(f"standard breakdown: reference distance {s['reference_distance_seconds']:.2f} s "
              f"+ eval_func {s['reference_eval_func_seconds']:.2f} s; evaluate's distance "
              f"products alone {s['evaluate_distance_only_seconds']:.2f} s")
    for mode, r in report["fresh_process"].items():
        print(f"fresh process, {mode}: {r['seconds']:.2f} s, peak extra host memory "
              f"{r['peak_extra_host_bytes'] / 2 ** 20:.0f} MiB ({r['memory_method']}), "
              f"mAP {r['metrics']['mAP']:.4f}")


if __name__ == "__main__":
    main()
