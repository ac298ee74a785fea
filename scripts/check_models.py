"""Every model config trains two batches with XGrad through the entry point's run, in each precision, here.

    python scripts/check_models.py --data device-data --out models.md                    # on the GPU: paper sizes
    python scripts/check_models.py --data device-data --out models.md --tiny trainer.device=cpu   # toy sizes

A code-path check, not a measurement: each model (every file of conf/model/)
runs ``xgrad.train.run`` in this process, one epoch of two training batches
and one batch of each evaluation split, once per ``--precisions``, plus
``trainer.compile=true`` for the ``--compile`` models and ``precision=16``
(gradient scaling) for the ``--fp16`` ones. Image models train on
Fashion-MNIST and language models on PTB, both read from ``--data``;
translation models on a copy task made from PTB's sentences (source =
target), which drives GNMT's code on the device without WMT16 being there.
``--tiny`` shrinks the models and batches to toy sizes (what the tests run).

Writes a Markdown table (model, precision, compile, status, seconds, training
loss, or the error's first line) to ``--out``, rewritten after every check,
and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from xgrad import atomic
from xgrad.messages import first_line
from xgrad.report.tables import markdown_table
from xgrad.train import CONF_DIR, run

MODELS = sorted(path.stem for path in (Path(CONF_DIR) / "model").glob("*.yaml"))
QUIET = ("logger=none", "trainer.progress=false", "trainer.epochs=1", "trainer.limit_train_batches=2",
         "trainer.limit_val_batches=1", "xgrad=on")  # fmt: skip
#: the data each modality trains on (data.root is --data; translation's is the copy task's folder)
DATA = {"image": ("data=fashion_mnist",), "text": ("data=ptb",), "translation": ("data=wmt16_en_de", "data.vocab_size=400")}
#: toy sizes: the same code, a fraction of the work
TINY_DATA = {
    "image": ("data.batch_size=8", "data.eval_batch_size=16"),
    "text": ("data.batch_size=4", "data.eval_batch_size=4", "data.bptt=8"),
    "translation": ("data.batch_size=8", "data.eval_batch_size=8", "model.task.beam_size=2", "model.task.max_decode_len=8"),
}
TINY_MODELS = {
    "resnet18": ("model.net.width=8",),
    "resnet34": ("model.net.width=8",),
    "densenet121": ("model.net.growth_rate=4",),
    "vit": ("model.net.embed_dim=32", "model.net.depth=2", "model.net.num_heads=2"),
    "vit_tiny": ("model.net.embed_dim=32", "model.net.depth=2", "model.net.num_heads=2"),
    "vit_small": ("model.net.embed_dim=32", "model.net.depth=2", "model.net.num_heads=2"),
    "lstm1": ("model.net.emb_size=16", "model.net.hidden_size=16"),
    "lstm2": ("model.net.emb_size=16", "model.net.hidden_size=16"),
    "lstm3": ("model.net.emb_size=16", "model.net.hidden_size=16"),
    "gnmt8": ("model.net.hidden_size=32",),
    # no width to shrink: two images a batch (bf16 convolutions on CPUs without bf16 units take minutes at eight)
    "inception_v3": ("data.batch_size=2", "data.eval_batch_size=2"),
}
#: lines of each PTB split in the copy task (enough for a BPE vocabulary of data.vocab_size pieces)
COPY_TASK_LINES = {"train": 4000, "valid": 200, "test": 200}


def write_copy_task(ptb: Path, root: Path) -> Path:
    """A WMT16-format folder whose pairs are PTB sentences copied (English → the same English)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in COPY_TASK_LINES.items():
        lines = (ptb / f"ptb.{split}.txt").read_text(encoding="utf-8").splitlines()[:count]
        text = "".join(line.strip() + "\n" for line in lines)
        for side in ("en", "de"):
            (root / f"{split}.{side}").write_text(text, encoding="utf-8")
    return root


def checks(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(model, precision, compiled) for every check asked for."""
    listed = [(model, str(precision), False) for model in args.models for precision in args.precisions]
    listed += [(model, "16", False) for model in args.fp16]
    listed += [(model, args.precisions[-1], True) for model in args.compile]  # last: compiling takes longest
    return listed


def check(model: str, precision: str, compiled: bool, args: argparse.Namespace, scratch: Path) -> dict:
    """One check: its status, its seconds and its training loss (or the error's first line)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        modality = compose("config", overrides=[f"model={model}"]).model.input
        root = scratch / "copy-task" if modality == "translation" else args.data
        overrides = [f"model={model}", *DATA[modality], f"data.root={root}", *QUIET, f"trainer.precision={precision}",
                     f"trainer.compile={str(compiled).lower()}",
                     *(TINY_DATA[modality] + TINY_MODELS.get(model, ()) if args.tiny else ()), *args.overrides]  # fmt: skip
        cfg = compose("config", overrides=overrides)
    run_dir = scratch / f"{model}-{precision}{'-compiled' if compiled else ''}"
    started = time.perf_counter()
    try:
        run(cfg, run_dir=run_dir)
        (line,) = (json.loads(text) for text in (run_dir / "metrics.jsonl").read_text().splitlines())
        outcome = {"status": "ok", "loss": f"{line['train/loss']:.4f}"}
    except Exception as error:  # noqa: BLE001 -- every check runs; the table says which failed and why
        traceback.print_exc()
        outcome = {"status": "FAILED", "loss": first_line(error)}
    return {"model": model, "precision": precision, "compiled": compiled, "seconds": time.perf_counter() - started,
            **outcome}  # fmt: skip


def render(rows: list[dict], args: argparse.Namespace) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    table = pd.DataFrame(
        [[r["model"], r["precision"], "yes" if r["compiled"] else "no", r["status"], f"{r['seconds']:.1f}", r["loss"]]
         for r in rows],
        columns=["model", "precision", "compiled", "status", "seconds", "train/loss or error"],
    )  # fmt: skip
    lines = [
        "# Every model, two training batches with XGrad (s = 1)",
        "",
        f"torch {torch.__version__} · {device} · {'toy sizes' if args.tiny else 'paper sizes'} · overrides: "
        f"{' '.join(args.overrides) or 'none'}",
        "",
        markdown_table(table),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every check (e.g. trainer.device=cpu)")
    parser.add_argument("--data", type=Path, required=True, help="folder with Fashion-MNIST's IDX and PTB's text files")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown table written")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, help="default: every model config")
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16"], choices=["32", "bf16", "16"])
    parser.add_argument("--compile", nargs="*", default=["resnet34"], choices=MODELS,
                        help="models also checked with trainer.compile=true (in the last precision)")
    parser.add_argument("--fp16", nargs="*", default=["resnet18"], choices=MODELS,
                        help="models also checked with precision=16 (autocast float16 and gradient scaling)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes of every model and batch")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.data = args.data.resolve()
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        write_copy_task(args.data, Path(scratch) / "copy-task")
        for model, precision, compiled in checks(args):
            rows.append(check(model, precision, compiled, args, Path(scratch)))
            r = rows[-1]
            print(f"{r['model']:12s} {r['precision']:>4s} {'compiled' if compiled else '':8s} {r['status']:6s} "
                  f"{r['seconds']:6.1f} s  {r['loss']}", flush=True)  # fmt: skip
            atomic.write_text(args.out, render(rows, args))  # after every check: a run cut short still leaves its table
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
