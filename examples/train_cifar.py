"""Train a CIFAR-10 model and export it to ONNX: the example models that sfp-onnx ships.

``--arch resnet`` (default) trains the CIFAR ResNet of ``--depth`` (ResNet-20 is
examples/resnet20_cifar10.onnx); ``--arch vgg`` the small CIFAR VGG with BatchNorm and a
two-layer classifier of sfp_onnx.training.zoo (examples/vgg_cifar10.onnx), a family without
residual joins.

Run from the repository root (sfp_onnx need not be installed; only torch, numpy and pillow are
needed to train, plus the onnx package to export):

    PYTHONPATH=. python examples/train_cifar.py                          # ImageFolder tree
    PYTHONPATH=. python examples/train_cifar.py --make-npz /tmp/c10.npz  # build a cache, exit
    PYTHONPATH=. python examples/train_cifar.py --npz /tmp/c10.npz --epochs 30
    ... --make-npz /tmp/c10j.npz --npz-jpeg 75   # 17.5 MiB cache of JPEGs, 163 MiB as uint8
    PYTHONPATH=. python examples/train_cifar.py --limit-train 512 --epochs 1   # smoke run
    PYTHONPATH=. python examples/train_cifar.py --export-only model.pt   # re-export a checkpoint

The whole data set lives on the device as uint8 (180 MB); augmentation (4-pixel-pad random
crop, horizontal flip) and normalisation run there too, batch by batch, so no DataLoader
workers are needed. Writes ``--out`` (ONNX, BatchNormalization kept, dynamic batch), and beside
it a ``.json`` with the results and a ``.pt`` checkpoint (state dict, arguments, results).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
try:
    from sfp_onnx.training.zoo import create_cifar_resnet, create_cifar_vgg, export_onnx
except ImportError:  # sfp_onnx/__init__ needs onnx, onnx-ir, onnxruntime: skip it, zoo needs torch
    for name in [m for m in sys.modules if m == "sfp_onnx" or m.startswith("sfp_onnx.")]:
        del sys.modules[name]
    sys.modules["sfp_onnx"] = types.ModuleType("sfp_onnx")
    sys.modules["sfp_onnx"].__path__ = [str(REPO / "sfp_onnx")]
    from sfp_onnx.training.zoo import create_cifar_resnet, create_cifar_vgg, export_onnx
# -----------------------------------------------------------------------------
# defaults: each is overridden by its flag (--depth, ..., --out; --data-root for DATA_ROOTS)
DATA_ROOTS = [REPO.parent / "shared/data/cifar10", REPO / "shared/data/cifar10"]  # first found
DEPTH = 20  # ResNet depth, 6n+2
EPOCHS = 30  # passes over the training set
BATCH_SIZE = 128  # images per SGD step (the last, partial batch of an epoch is kept)
LR = 0.1  # peak learning rate, reached at the end of the warmup
WARMUP_EPOCHS = 1  # linear warmup, then cosine decay to 0 at the last step
MOMENTUM = 0.9  # SGD momentum, Nesterov
WEIGHT_DECAY = 5e-4  # L2 penalty on every parameter (as the SFP reference code)
LABEL_SMOOTHING = 0.0  # cross-entropy label smoothing
SEED = 0  # seeds init, shuffling, augmentation and --limit-train's subset
OUT = REPO / "examples/resnet20_cifar10.onnx"  # ONNX output; .json and .pt go beside it
# fixed
EVAL_BATCH = 1000  # images per forward pass when evaluating
MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 training-set channel mean
STD = (0.2470, 0.2435, 0.2616)  # CIFAR-10 training-set channel std
# -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_argument_group("data")
    src.add_argument("--data-root", type=Path, help="ImageFolder tree with train/ and test/")
    src.add_argument("--npz", type=Path, help="uint8 cache: x_train, y_train, x_test, y_test")
    src.add_argument("--make-npz", type=Path, help="build the --npz cache from --data-root, exit")
    src.add_argument("--npz-jpeg", type=int, metavar="Q", help="--make-npz stores JPEG quality Q")
    src.add_argument("--limit-train", type=int, help="train on a random subset of N images")
    src.add_argument("--limit-test", type=int, help="evaluate on a random subset of N")
    opt = p.add_argument_group("training")
    opt.add_argument("--arch", choices=["resnet", "vgg"], default="resnet")
    opt.add_argument("--depth", type=int, default=DEPTH, help="resnet: depth 6n+2")
    opt.add_argument("--epochs", type=int, default=EPOCHS)
    opt.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    opt.add_argument("--lr", type=float, default=LR)
    opt.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS)
    opt.add_argument("--momentum", type=float, default=MOMENTUM)
    opt.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    opt.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING)
    opt.add_argument("--seed", type=int, default=SEED)
    opt.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    opt.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=OUT, help="ONNX file to write")
    out.add_argument("--export-only", type=Path, metavar="CKPT", help="export a .pt and exit")
    args = p.parse_args(argv)
    if args.data_root is None:
        args.data_root = next((d for d in DATA_ROOTS if d.is_dir()), DATA_ROOTS[0])
    return args


# ---------------------------------------------------------------------------- data


def load_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``folder/<class>/*.png`` (classes = sorted folder names) as uint8 NHWC + labels."""
    if not folder.is_dir():
        sys.exit(f"error: {folder} not found; pass --data-root or --npz")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((folder / c).iterdir())]
    if not files:
        sys.exit(f"error: no images under {folder}")

    def read(f: Path) -> np.ndarray:
        with Image.open(f) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    with ThreadPoolExecutor(8) as pool:
        x = np.stack(list(pool.map(read, [f for f, _ in files], chunksize=256)))
    return x, np.array([k for _, k in files], dtype=np.int64)


def pack_jpeg(x: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode each HWC uint8 image as JPEG: (all bytes joined, start offsets with the end)."""

    def encode(im: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    with ThreadPoolExecutor(8) as pool:
        blobs = list(pool.map(encode, x, chunksize=256))
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def unpack_jpeg(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of pack_jpeg: decode to uint8 NHWC."""

    def decode(i: int) -> np.ndarray:
        with Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    with ThreadPoolExecutor(8) as pool:
        return np.stack(list(pool.map(decode, range(len(offsets) - 1), chunksize=256)))


def load_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """x_train [N,32,32,3] uint8, y_train [N] int64, x_test, y_test, from --npz or the tree."""
    if args.npz:
        with np.load(args.npz) as z:
            data = {k: z[k] for k in ("y_train", "y_test")}
            for split in ("train", "test"):
                x = f"x_{split}"
                data[x] = z[x] if x in z else unpack_jpeg(z[f"{x}_jpeg"], z[f"{x}_offsets"])
    else:
        data = {}
        for split in ("train", "test"):
            data[f"x_{split}"], data[f"y_{split}"] = load_split(args.data_root / split)
    data["y_train"] = data["y_train"].astype(np.int64)
    data["y_test"] = data["y_test"].astype(np.int64)
    rng = np.random.default_rng(args.seed)
    for split, limit in (("train", args.limit_train), ("test", args.limit_test)):
        if limit:  # a random subset: the tree and the cache are sorted by class
            keep = np.sort(rng.permutation(len(data[f"y_{split}"]))[:limit])
            data[f"x_{split}"], data[f"y_{split}"] = (
                data[f"x_{split}"][keep],
                data[f"y_{split}"][keep],
            )
    return data


def to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC numpy -> uint8 NCHW tensor on the device (contiguous)."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image, flipped left-right half the time.

    One gather on uint8 NCHW, on whatever device ``x`` lives.
    """
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n, 1, 1, 1), device=dev)
    dx = torch.randint(0, 9, (n, 1, 1, 1), device=dev)
    flip = torch.rand(n, 1, 1, 1, device=dev) < 0.5
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    rows = torch.arange(h, device=dev).view(1, 1, h, 1) + dy
    return padded[
        torch.arange(n, device=dev).view(n, 1, 1, 1),
        torch.arange(c, device=dev).view(1, c, 1, 1),
        rows,
        cols,
    ]


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float().div_(255) - mean) / std


# ---------------------------------------------------------------------------- training


def get_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total``."""
    if step < warmup:  # 1) linear warmup: peak/warmup ... peak
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)  # 2) cosine from peak down to 0
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, x, y, mean, std, batch: int, autocast) -> float:
    """Top-1 accuracy (%) on (x, y), in eval mode; the model is returned in train mode."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch):
        with autocast():
            logits = model(normalize(x[i : i + batch], mean, std))
        correct += (logits.argmax(1) == y[i : i + batch]).sum()
    model.train()
    return 100.0 * correct.item() / len(x)


def create_model(arch: str, depth: int) -> torch.nn.Module:
    """The network to train: a CIFAR ResNet of ``depth``, or the CIFAR VGG."""
    return create_cifar_resnet(depth) if arch == "resnet" else create_cifar_vgg()


def train(args: argparse.Namespace, data: dict[str, np.ndarray], device: torch.device) -> dict:
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    )
    x_train, x_test = to_device(data["x_train"], device), to_device(data["x_test"], device)
    y_train, y_test = (torch.from_numpy(data[k]).to(device) for k in ("y_train", "y_test"))
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    model = create_model(args.arch, args.depth).to(device, memory_format=fmt)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        nesterov=True,
        weight_decay=args.weight_decay,
    )
    n = len(x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    print(
        f"{n} train / {len(x_test)} test images, {steps_per_epoch} steps per epoch, device {device}"
    )

    history, step, t_start = [], 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for i in range(steps_per_epoch):
            lr = get_lr(step, total, warmup, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x = normalize(augment(x_train[idx]), mean, std).contiguous(memory_format=fmt)
            with autocast():
                logits = model(x)
            loss = F.cross_entropy(
                logits.float(), y_train[idx], label_smoothing=args.label_smoothing
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum()
            step += 1
        test_acc = evaluate(model, x_test, y_test, mean, std, EVAL_BATCH, autocast)
        row = {
            "epoch": epoch,
            "loss": round(loss_sum.item() / n, 4),
            "train_acc": round(100.0 * correct.item() / n, 2),
            "test_acc": round(test_acc, 2),
            "lr": lr,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        history.append(row)
        print(
            f"epoch {epoch:3d} | loss {row['loss']:.4f} | train {row['train_acc']:6.2f}% | "
            f"test {row['test_acc']:6.2f}% | lr {lr:.5f} | {row['seconds']:.1f}s",
            flush=True,
        )
    seconds = time.perf_counter() - t_start
    model = model.to("cpu", memory_format=torch.contiguous_format).float()
    return {"model": model, "result": describe_run(args, history, n, len(x_test), seconds, device)}


def describe_run(args, history: list[dict], n_train: int, n_test: int, seconds, device) -> dict:
    """The record written to the .json: final accuracy, timing, environment, command line."""
    return {
        "model": f"resnet{args.depth}" if args.arch == "resnet" else "vgg",
        "dataset": "cifar10",
        "test_acc": history[-1]["test_acc"] if history else None,
        "train_images": n_train,
        "test_images": n_test,
        "epochs": args.epochs,
        "seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": str(torch.__version__),
        "command": shlex.join(["python", *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "history": history,
    }


# ---------------------------------------------------------------------------- output


def save_outputs(model: torch.nn.Module, result: dict, out: Path) -> None:
    """Write the ONNX (BN kept, dynamic batch, opset 17) and the .json beside it."""
    try:
        export_onnx(model, out, opset=17, dynamic_batch=True, fold_bn=False)
        result["onnx"] = out.name
        print(f"wrote {out}")
    except (ImportError, torch.onnx.OnnxExporterError) as exc:  # e.g. no onnx package
        result["onnx"] = None
        ckpt = out.with_suffix(".pt")
        print(f"ONNX export skipped ({exc}); install onnx, then run --export-only {ckpt}")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.json')}")


def export_checkpoint(ckpt_path: Path, out: Path) -> None:
    """--export-only: rebuild the model from a .pt written by this script, then save_outputs."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    saved = ckpt["result"]["args"]
    model = create_model(saved.get("arch", "resnet"), saved["depth"])
    model.load_state_dict(ckpt["model"])
    save_outputs(model, ckpt["result"], out)


def make_npz(data_root: Path, path: Path, jpeg_quality: int | None) -> None:
    """--make-npz: read the whole ImageFolder tree once and save it as a compressed .npz.

    With ``jpeg_quality`` each x_<split> is stored as x_<split>_jpeg (the JPEG files, joined)
    and x_<split>_offsets instead: 17.5 MiB at quality 75 rather than 163 MiB, and for this
    JPEG-derived CIFAR-10 tree the decoded pixels differ by only 0.16 grey levels on average.
    """
    t0 = time.perf_counter()
    data = {}
    for split in ("train", "test"):
        x, data[f"y_{split}"] = load_split(data_root / split)
        if jpeg_quality is None:
            data[f"x_{split}"] = x
        else:
            data[f"x_{split}_jpeg"], data[f"x_{split}_offsets"] = pack_jpeg(x, jpeg_quality)
    np.savez_compressed(path, **data)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB) in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export_only:
        return export_checkpoint(args.export_only, args.out)
    if args.make_npz:
        return make_npz(args.data_root, args.make_npz, args.npz_jpeg)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    t0 = time.perf_counter()
    data = load_data(args)
    print(f"loaded data in {time.perf_counter() - t0:.1f}s")
    trained = train(args, data, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"model": trained["model"].state_dict(), "result": trained["result"]}
    torch.save(ckpt, args.out.with_suffix(".pt"))
    save_outputs(trained["model"], trained["result"], args.out)


if __name__ == "__main__":
    main()
