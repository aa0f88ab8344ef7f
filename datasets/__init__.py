"""condmoe.datasets: WebDataset shards: write, verify, stream, resume.

Write a source as ``{split}-%06d.tar`` shards plus ``manifest.parquet``
(:func:`write_shards`), check them (:func:`verify_shards`), and read them with
:class:`StreamingLoader`: deterministic per (seed, epoch), rank- and worker-aware,
equal steps on every rank, exact mid-epoch resume, bad data skipped and counted.
Photo collections keep their original JPEG bytes in the shards and are decoded, cropped
and flipped per sample at a chosen ``resolution`` (:mod:`condmoe.datasets.imaging`).
"""

from .idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_default_images, load_digits_images, load_fashion_mnist
from .loader import StreamingLoader
from .imaging import IMAGENET_MEAN, IMAGENET_STD
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest
from .photos import make_photo_folder
from .sources import open_source
from .stream import Batch, resolve_shards
from .verify import BadShard, SplitSummary, VerifyReport, summarize_shards, verify_shards
from .writer import write_shards

__all__ = [
    "Batch", "BadShard", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGENET_MEAN", "IMAGENET_STD",
    "MANIFEST_NAME", "Manifest", "ShardInfo", "make_photo_folder",
    "SplitSummary", "StreamingLoader", "VerifyReport", "load_default_images", "load_digits_images",
    "load_fashion_mnist", "open_source", "read_manifest", "resolve_shards", "summarize_shards",
    "verify_shards", "write_shards",
]
