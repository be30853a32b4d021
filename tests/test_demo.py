"""The main job end to end on the bundled sample with the shipped vlkit-tiny (small budget)."""

import json


def test_demo_writes_table_plot_prompt_and_words(tmp_path):
    from vlkit.adapt import prompt_io
    from vlkit.demo import run_demo

    lines: list[str] = []
    run = run_demo(tmp_path, shots=(2,), epochs=2, views=1, log=lines.append)
    assert (run / "fewshot" / "fewshot.png").stat().st_size > 1000
    table = (run / "fewshot" / "table.md").read_text()
    for method in ("zeroshot", "linear-probe", "coop"):
        assert f"| {method} |" in table
    records = json.loads((run / "metrics.json").read_text())["fewshot"]
    accs = {r["method"]: r["acc"] for r in records}
    assert accs["zeroshot"] > 3 * 100 / 9, "vlkit-tiny zero-shot on the sample's 9 groups is far above chance"
    assert accs["coop"] > 100 / 9
    saved = prompt_io.load_prompt(run / "prompt")
    assert saved.ctx.shape[-2] == 16 and len(saved.classnames) == 9
    assert "ctx 16:" in (run / "nearest_words.txt").read_text()
    assert any("nearest vocabulary words" in line for line in lines)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["epochs"] == 2 and cfg["model_fingerprint"]
