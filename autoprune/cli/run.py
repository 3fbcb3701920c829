"""``autoprune run``: the whole pipeline from the command line.

    autoprune run --model torchvision.models:resnet18 --model-kwargs '{"num_classes": 10}' \\
        --input-shape 1,3,32,32 --device onnxruntime-cpu --budget-fraction 0.5 \\
        --data digits --pretrain-epochs 3 --run-dir runs/resnet18

The model is an importable factory ``module:callable`` (called with ``--model-kwargs``), with
optional weights (``--weights w.pt``, a state_dict loaded with ``torch.load(weights_only=True)``).
``--data`` gives the data for fine-tuning, the search's accuracy proxy and the reported
accuracy, in one of three forms:

- a bundled dataset: ``digits``, ``mnist1d`` or ``glyphs`` (``autoprune.data``);
- an importable factory ``module:callable`` (called with ``--data-kwargs``, a JSON object) that
  returns ``(train_loader, val_loader)``, each re-iterable and yielding ``(inputs, labels)``
  batches whose inputs match ``--input-shape`` apart from the batch dimension;
- a directory in ``torchvision.datasets.ImageFolder`` layout, ``DIR/train/<class>/*.png`` and
  ``DIR/val/<class>/*.png`` with the same classes: images are resized to the H,W of
  ``--input-shape``, converted to its channel count (1 grayscale, 3 RGB) and normalised with
  mean 0.5 / std 0.5 per channel; ``--data-kwargs`` may set ``batch_size``, ``mean``, ``std``
  (e.g. ImageNet's for torchvision weights) and ``num_workers``.

The validation split (the bundled test split, the factory's second loader, ``DIR/val``) scores
the search's candidates and is what the report's accuracies are measured on. Without data the
run stops after search and verification (no fine-tuning, no accuracy).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from autoprune.cli.common import (
    add_backend_args,
    backend_options,
    load_model,
    parse_kwargs,
    parse_shape,
    resolve_factory,
)
from autoprune.errors import InvalidInputError
from autoprune.io import atomic_torch_save, safe_torch_load

DATASETS = ("digits", "mnist1d", "glyphs")


def data_loaders(name: str, shape: tuple[int, ...], seed: int = 0) -> tuple[Any, Any]:
    from autoprune import data

    if name == "digits":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise InvalidInputError(f"--data digits needs a square image shape N,C,H,H, got {shape}")
        return data.digits_loaders(size=shape[2], channels=shape[1], seed=seed)
    if name == "mnist1d":
        if len(shape) != 3 or shape[1:] != (1, 40):
            raise InvalidInputError(f"--data mnist1d needs --input-shape N,1,40, got {shape}")
        return data.mnist1d_loaders(seed=seed)
    if name == "glyphs":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise InvalidInputError(f"--data glyphs needs a square image shape N,C,H,H, got {shape}")
        return data.glyphs_loaders(size=shape[2], channels=shape[1], seed=seed)
    raise InvalidInputError(f"unknown --data {name!r}; known: {', '.join(DATASETS)}")


#: the keyword arguments an image folder takes in --data-kwargs
FOLDER_OPTIONS = ("batch_size", "mean", "std", "num_workers")


def load_data(data: str, shape: tuple[int, ...], kwargs_json: str | None = None,
              seed: int = 0) -> tuple[Any, Any]:
    """``(train_loader, val_loader)`` for ``--data``: a bundled name (``DATASETS``), an
    existing directory in ImageFolder layout, or a factory ``module:callable``."""
    if data in DATASETS:
        if kwargs_json:
            raise InvalidInputError(
                f"--data-kwargs applies to a factory or an image folder, not to the bundled "
                f"--data {data}; drop --data-kwargs")
        return data_loaders(data, shape, seed)
    if Path(data).exists():
        return image_folder_loaders(Path(data), shape, parse_kwargs(kwargs_json, "--data-kwargs"),
                                    seed)
    if ":" in data:
        return factory_loaders(data, shape, parse_kwargs(kwargs_json, "--data-kwargs"))
    raise InvalidInputError(
        f"--data {data!r} is neither a bundled dataset ({', '.join(DATASETS)}), nor an existing "
        "directory (ImageFolder layout with train/ and val/), nor a factory 'module:callable' "
        "returning (train_loader, val_loader)")


def factory_loaders(factory: str, shape: tuple[int, ...],
                    kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Call the ``--data`` factory and check what it returns: two re-iterable loaders whose
    first batches are ``(inputs, integer labels)`` with inputs shaped like ``shape`` apart from
    the batch dimension."""
    fn = resolve_factory(factory, "--data", "mypackage.data:loaders")
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise InvalidInputError(
            f"--data {factory} could not be called with --data-kwargs {kwargs}: {e}") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call itself will say
    out = fn(**kwargs)
    what = f"--data factory {factory}"
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = (f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list))
               else f"one {type(out).__name__}")
        raise InvalidInputError(
            f"{what} must return a pair (train_loader, val_loader), got {got}; return both, "
            "e.g. (DataLoader(train_set, shuffle=True), DataLoader(val_set))")
    for role, loader in zip(("train", "val"), out):
        check_loader(loader, shape, f"{what}: its {role} loader")
    return out[0], out[1]


def check_loader(loader: Any, shape: tuple[int, ...], what: str) -> None:
    """``loader`` is re-iterable and its first batch is ``(inputs, labels)``: one input tensor
    of ``shape`` apart from dim 0 and a 1-D integer label tensor of the same batch size."""
    import torch

    from autoprune._finetune._batch import split_batch

    if isinstance(loader, (str, bytes, torch.Tensor)) or not isinstance(loader, Iterable):
        raise InvalidInputError(
            f"{what} is a {type(loader).__name__}, not an iterable of (inputs, labels) batches "
            "(a torch.utils.data.DataLoader, for example)")
    if iter(loader) is loader:
        raise InvalidInputError(
            f"{what} is a one-shot iterator ({type(loader).__name__}): training and evaluation "
            "iterate it many times; return a re-iterable loader (a DataLoader, a list of batches)")
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise InvalidInputError(f"{what} yields no batches (an empty dataset?)") from None
    try:
        inputs, labels = split_batch(batch)
    except InvalidInputError as e:
        raise InvalidInputError(f"{what}: {e}") from None
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        got = (f"{len(inputs)} input tensors" if len(inputs) != 1
               else f"a {type(inputs[0]).__name__}")
        raise InvalidInputError(
            f"{what} yields {got} as inputs; --input-shape describes one input tensor")
    x = inputs[0]
    if tuple(x.shape[1:]) != tuple(shape[1:]):
        want = ",".join(str(v) for v in ("N", *shape[1:]))
        raise InvalidInputError(
            f"{what} yields inputs of shape {tuple(x.shape)}, but --input-shape "
            f"{','.join(map(str, shape))} asks for {want} (any batch size N); make them agree")
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 1
            or labels.dtype.is_floating_point or labels.dtype.is_complex
            or labels.dtype == torch.bool):
        got = (f"a {labels.dtype} tensor of shape {tuple(labels.shape)}"
               if isinstance(labels, torch.Tensor) else f"a {type(labels).__name__}")
        raise InvalidInputError(
            f"{what} yields labels as {got}; they must be a 1-D integer tensor of class "
            "indices (torch.long), one per input")
    if labels.shape[0] != x.shape[0]:
        raise InvalidInputError(
            f"{what} yields {x.shape[0]} inputs but {labels.shape[0]} labels in a batch")


def image_folder_loaders(root: Path, shape: tuple[int, ...], options: dict[str, Any],
                         seed: int = 0) -> tuple[Any, Any]:
    """Loaders over ``root/train`` and ``root/val`` (``torchvision.datasets.ImageFolder``):
    images resized to ``shape``'s H,W, converted to its channel count (1 or 3), normalised."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    if not root.is_dir():
        raise InvalidInputError(
            f"--data {root} is a file; an image folder is a directory with train/<class>/ and "
            "val/<class>/ subfolders of images")
    unknown = sorted(set(options) - set(FOLDER_OPTIONS))
    if unknown:
        raise InvalidInputError(
            f"--data-kwargs {unknown} are not options of an image folder; known: "
            f"{', '.join(FOLDER_OPTIONS)}")
    if len(shape) != 4:
        raise InvalidInputError(
            f"--data {root} (images) needs --input-shape N,C,H,W, got {','.join(map(str, shape))}")
    _, channels, height, width = shape
    if channels not in (1, 3):
        raise InvalidInputError(
            f"--data {root}: images load as 1 (grayscale) or 3 (RGB) channels, but "
            f"--input-shape asks for {channels}")
    batch_size = _positive_int(options.get("batch_size", 64), "batch_size")
    num_workers = _positive_int(options.get("num_workers", 0), "num_workers", allow_zero=True)
    mean = _per_channel(options.get("mean", 0.5), "mean", channels)
    std = _per_channel(options.get("std", 0.5), "std", channels)
    if any(v <= 0 for v in std):
        raise InvalidInputError(f"--data-kwargs std must be positive, got {options.get('std')}")

    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        sub = root / split
        if not sub.is_dir():
            raise InvalidInputError(
                f"--data {root} has no {split}/ subfolder; an image folder needs "
                f"{root}/train/<class>/*.png and {root}/val/<class>/*.png")
        names = sorted(p.name for p in sub.iterdir() if p.is_dir())
        if not names:
            raise InvalidInputError(
                f"--data {sub} has no class subfolders (an empty class set); put each class's "
                f"images in {sub}/<class>/")
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise InvalidInputError(
            f"--data {root}: the classes of train/ and val/ differ (only in train: "
            f"{only_train or 'none'}; only in val: {only_val or 'none'}); both need the same "
            "class folders, or the label indices would not match")

    steps: list[Any] = [transforms.Resize((height, width))]
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    tf = transforms.Compose(steps)
    sets = {}
    for split in ("train", "val"):
        try:
            sets[split] = datasets.ImageFolder(str(root / split), transform=tf)
        except (FileNotFoundError, OSError) as e:
            raise InvalidInputError(f"--data {root / split}: {e}") from None
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(sets["train"], batch_size=batch_size, shuffle=True, generator=g,
                   num_workers=num_workers),
        DataLoader(sets["val"], batch_size=max(batch_size, 256), shuffle=False,
                   num_workers=num_workers),
    )


def check_classes(model: Any, example: Any, val_loader: Any, data: str) -> None:
    """A dataset that names its classes (an image folder) must not have more of them than the
    model has outputs (cross-entropy would fail deep in fine-tuning)."""
    import torch

    classes = getattr(getattr(val_loader, "dataset", None), "classes", None)
    if not isinstance(classes, list):
        return
    try:
        with torch.no_grad():
            out = model(example)
    except Exception:  # noqa: BLE001 - analyze reports inputs that do not fit, with the fix
        return
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[-1] < len(classes):
        raise InvalidInputError(
            f"--data {data} has {len(classes)} classes but the model gives {out.shape[-1]} "
            f"outputs; build it with that many, e.g. --model-kwargs '{{\"num_classes\": "
            f"{len(classes)}}}'")


def _positive_int(value: Any, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise InvalidInputError(
            f"--data-kwargs {name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")
    return value


def _per_channel(value: Any, name: str, channels: int) -> list[float]:
    vals = value if isinstance(value, list) else [value] * channels
    if len(vals) != channels or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        raise InvalidInputError(
            f"--data-kwargs {name} must be a number or a list of {channels} numbers (one per "
            f"channel), got {value!r}")
    return [float(v) for v in vals]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="analyze, profile, search, prune, fine-tune, verify and export in one go",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="importable factory, module:callable")
    p.add_argument("--model-kwargs", default=None, help='JSON keyword arguments, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--weights", default=None, help="state_dict file (torch.load weights_only=True)")
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,32,32")
    add_backend_args(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=float, help="latency budget in ms")
    budget.add_argument("--budget-fraction", type=float,
                        help="budget as a share of the dense model's latency on the device "
                        "(0-1), checked with paired ratios (robust on a noisy machine)")
    p.add_argument("--data", default=None,
                   help=f"training/validation data: a bundled dataset ({', '.join(DATASETS)}), "
                   "a factory module:callable returning (train_loader, val_loader), or a "
                   "directory with train/<class>/ and val/<class>/ image folders")
    p.add_argument("--data-kwargs", default=None,
                   help="JSON keyword arguments for a --data factory, or an image folder's "
                   f"options ({', '.join(FOLDER_OPTIONS)})")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="train the dense model on --data first (when no --weights)")
    p.add_argument("--run-dir", required=True, help="run directory (resumed if it exists)")
    p.add_argument("--n-trials", type=int, default=60)
    p.add_argument("--predictor-samples", type=int, default=60)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--tables-root", default="latency_tables",
                   help="latency table directory to reuse/extend (default: latency_tables)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    shape = parse_shape(args.input_shape)
    model = load_model(args.model, args.model_kwargs, args.weights)
    example = torch.randn(*shape)
    train_loader = val_loader = None
    if args.data:
        train_loader, val_loader = load_data(args.data, shape, args.data_kwargs, args.seed)
        check_classes(model, example, val_loader, args.data)
    elif args.data_kwargs:
        raise InvalidInputError("--data-kwargs needs --data (a factory or an image folder)")
    if args.pretrain_epochs > 0:
        if train_loader is None:
            raise InvalidInputError("--pretrain-epochs needs --data")
        weights = Path(args.run_dir) / "dense.pt"

        if weights.exists():
            model.load_state_dict(safe_torch_load(weights))
        else:
            from autoprune._finetune import finetune

            finetune(model, train_loader, epochs=args.pretrain_epochs, lr=args.lr * 5,
                     seed=args.seed, progress=not args.quiet)
            atomic_torch_save(model.state_dict(), weights)
        model.eval()
    if args.budget_fraction is not None and not 0 < args.budget_fraction < 1:
        raise InvalidInputError(f"--budget-fraction must be in (0, 1), got {args.budget_fraction}")
    from autoprune.pipeline import run_pipeline

    report = run_pipeline(
        model, (example,), latency_budget_ms=args.budget_ms,
        budget_fraction=args.budget_fraction, run_dir=args.run_dir,
        train_loader=train_loader, val_loader=val_loader, device=args.device,
        backend_options=backend_options(args), n_trials=args.n_trials,
        predictor_samples=args.predictor_samples,
        finetune_epochs=args.finetune_epochs if train_loader is not None else 0,
        finetune_options={"lr": args.lr}, tables_root=args.tables_root,
        export=not args.no_export, seed=args.seed, progress=not args.quiet,
    )
    print(report)
    return 0 if report.budget_met in (True, None) else 1
