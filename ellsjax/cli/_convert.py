"""``ellsjax convert``: a released PyTorch network (Kamb & Ganguli's backbones, the locality papers'
DDPM UNet) into an ellsjax run directory, without torch and without running code from the file."""

from __future__ import annotations

import argparse
import pickle

from ellsjax.cli._common import HelpFormatter, output_dir
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]


def register(sub) -> None:
    """Add the ``convert`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "convert",
        help="convert a released PyTorch network (.pt) into an ellsjax run directory",
        description=(
            "Read a torch.save file -- a whole pickled MinimalResNet / MinimalUNet (Kamb & Ganguli's "
            "files/backbone_*.pt) or a state dict of one, or the DDPM UNet state dict of the locality papers "
            "({'model_state_dict': ...}) -- without torch, through a restricted unpickler that imports and calls "
            "nothing the file names, and write OUT as an ordinary ellsjax run (config.json + orbax checkpoint) for "
            "`sample --model`, `calibrate`, `evaluate` and ellsjax.models.load. The architecture comes from the file; "
            "the options give what it does not record (image size, dataset, a state dict's padding) and are checked "
            "against what it does."
        ),
        formatter_class=HelpFormatter,
    )
    s.add_argument("file", help="the .pt file")
    s.add_argument("--out", required=True, help="run directory to create")
    s.add_argument("--preset", default=None, metavar="NAME",
                   help="a paper network (e.g. MNIST_ResNet_zeros: 32x32, its dataset and padding) or a locality "
                        "run (locality-cifar10, locality-mnist: the DDPM UNet's image size and dataset)")
    s.add_argument("--arch", choices=("resnet", "unet", "ddpm-unet"), default=None,
                   help="architecture (checked against the file's keys)")
    s.add_argument("--image-size", type=int, default=None, help="side of the images the network was trained on")
    s.add_argument("--channels", type=int, default=None, help="image channels (checked against the file)")
    s.add_argument("--padding", choices=("zeros", "circular"), default=None,
                   help="conv padding (a state dict does not record it)")
    s.add_argument("--dataset", default=None, help="dataset it was trained on: mnist, fashion_mnist, cifar10, celeb_a")
    g = s.add_argument_group("data the tools load with the run (calibrate, evaluate)")
    g.add_argument("--source", default="auto", choices=("bundled", "npz", "idx", "tfds", "auto"),
                   help="where its training images come from (see ellsjax.data.load; auto: the whole split from "
                        "$ELLSJAX_DATA_DIR or tensorflow-datasets)")
    g.add_argument("--path", default=None, help="file or directory for --source npz/idx")
    g.add_argument("--limit", type=int, default=None, help="use the first N training images only")
    s.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from ellsjax import convert, locality

    output_dir(args.out)  # a bad location fails before the file is read
    network, dataset = None, args.dataset
    if args.preset in locality.PRESETS:  # a locality run's network: the DDPM UNet it trains
        p = locality.PRESETS[args.preset]
        network, dataset = p.net, args.dataset or p.train.dataset
    try:
        c = convert.convert(args.file, args.out, arch=args.arch, preset=args.preset, image_size=args.image_size,
                            channels=args.channels, padding=args.padding, dataset=dataset, source=args.source,
                            path=args.path, limit=args.limit, preset_network=network)
    except (ValueError, TypeError, FileNotFoundError, pickle.UnpicklingError) as e:
        _fail(str(e))
    n = c.net
    shape = "x".join(map(str, n.image_shape))
    print(f"converted {args.file} ({c.info['source_class']}, {c.info['parameters']:,} parameters) -> {args.out}: "
          f"{n.arch} on {shape} {c.info['dataset']} images, {n.padding} padding"
          f"{', conditional' if n.conditional else ''}; {c.info['time']}; {c.info['seconds']:.1f} s")
    return 0
