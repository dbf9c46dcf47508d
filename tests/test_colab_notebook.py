"""experiments/colab_demo.ipynb runs top to bottom (nbclient) with a test-sized model on CPU."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    for name, value in {"STEPS": "4", "MODEL": "test", "SEQ_LEN": "32", "WINDOW": "12",
                        "VOCAB": "384", "WORKDIR": str(tmp_path / "run")}.items():
        monkeypatch.setenv(f"JAXLM_DEMO_{name}", value)
    monkeypatch.setenv("JAXLM_ROOT", str(ROOT))
    monkeypatch.setenv("XLA_FLAGS", "")  # the kernel sees one CPU device, as in Colab
    nb = nbformat.read(ROOT / "experiments" / "colab_demo.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "experiments")}}).execute()
    outputs = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells
               if c.cell_type == "code"]
    text = "\n".join(outputs)
    assert "'steps': 4" in text
    # keys [L, B, K, H, W], values [L, B, K, W, H]: W slots, not 100k
    # "test" preset: L=2, K=4, H=8; WINDOW=12 slots, not 100k
    assert "cache k/v shape for a 100k-token generation: (2, 1, 4, 8, 12) (2, 1, 4, 12, 8)" in text
    assert "--- greedy ---" in text and "--- T=0.8, top_p=0.9 ---" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the loss curve
    assert (tmp_path / "run" / "model" / "config.json").is_file()
