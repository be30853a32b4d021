"""The main job (`make demo` / `vlkit demo`): few-shot adaptation on the bundled sample.

On the sample's `emoji-group` task with the embedded vlkit-tiny it compares
zero-shot, the linear probe and CoOp (M=16, unified context, class token at the
end) at a few shot counts, prints the table, saves the accuracy-vs-shots plot,
saves the 16-shot prompt and prints its nearest vocabulary words. Everything runs
offline on a CPU with the paper's recipe (50/100/200 epochs by shots) on cached
image features; `epochs` sets a smaller budget, stated in the output and config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from vlkit import io, runs
from vlkit.adapt import DEFAULT_VIEWS

DEMO_TASK = "emoji-group"
DEMO_METHODS = ("zeroshot", "linear-probe", "coop")


def run_demo(
    out: str | Path = "runs",
    *,
    model: str = "vlkit-tiny",
    task: str = DEMO_TASK,
    shots: Sequence[int] = (1, 4, 16),
    seed: int = 1,
    epochs: int | None = None,
    views: int = DEFAULT_VIEWS,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the demo into a fresh run folder under `out` and return that folder."""
    from vlkit.adapt import interpret, prompt_io
    from vlkit.bench.data import TaskFeatures
    from vlkit.bench.fewshot import run_fewshot
    from vlkit.models import load_model

    runs.seed_everything(seed)
    budget = "the paper's (50/100/200 by shots)" if epochs is None else f"{epochs} (reduced; the paper uses 50/100/200 by shots)"
    vl = load_model(model)
    run_dir = runs.new_run_dir(out, "demo")
    settings = {"model": model, "task": task, "data_dir": "sample", "methods": list(DEMO_METHODS),
                "shots": list(shots), "seed": seed, "epochs": epochs, "views": views}
    runs.write_config(run_dir, settings, command="demo", model_fingerprint=vl.fingerprint())
    log(f"vlkit demo: {model} on the bundled sample's '{task}' task; methods {', '.join(DEMO_METHODS)}; "
        f"shots {list(shots)}, seed {seed}; CoOp epochs: {budget}; {views} cached augmented views per image")

    learners: dict[int, object] = {}

    def keep(key: dict, fitted) -> None:
        if key["method"] == "coop":
            learners[key["shots"]] = fitted.artefacts["learner"]

    provider = TaskFeatures(vl, "sample", views=views)
    records = run_fewshot([task], DEMO_METHODS, shots, [seed], run_dir / "fewshot", provider=provider,
                          epochs=epochs, on_fit=keep, log=log)
    table = (run_dir / "fewshot" / "table.md").read_text(encoding="utf-8")
    log("\n" + table)

    top = max(learners)
    learner = learners[top]
    near = interpret.nearest_tokens(vl, learner.ctx, k=3)
    words = interpret.describe(near, learner.classnames)
    io.write_text(run_dir / "nearest_words.txt", words + "\n")
    trained = next(r["info"]["epochs"] for r in records if r["method"] == "coop" and r["shots"] == top)
    prompt_io.save_prompt(run_dir / "prompt", learner, vl, extra={"training": {"shots": top, "epochs": trained, "seed": seed}})
    log(f"nearest vocabulary words of the {top}-shot CoOp context (Euclidean, token-embedding space):\n{words}")
    runs.write_metrics(run_dir, {"fewshot": [r for r in records if r["task"] == task]})
    log(f"plot: {run_dir / 'fewshot' / 'fewshot.png'}\nprompt: {run_dir / 'prompt'}\nrun folder: {run_dir}")
    return run_dir
