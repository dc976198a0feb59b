"""Classifier settings, checked when built: what ``classifier.py`` trains and ``compare.py`` shares across its runs.

``ClassifierSettings`` holds everything a run and a comparison have in common; ``ClassifyConfig`` adds the
one run's training set and folder, so ``compare.py`` has no ``--train`` flag that it would have to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cli import option
from ..devices import AUTO
from ..errors import InputError
from .data import AUGMENTATIONS, SHARE_PER, TRAIN_MODES

BALANCING = ("none", "sampler", "loss")
# The options that shape only a real + synthetic run: compare.py gives them to its mixed run alone, and a resumed run
# must keep them.
MIXING_OPTIONS = (
    *("synthetic_share", "share_per", "synthetic_weight", "swap_probability", "finetune_epochs", "synthetic_bn"),
    "init_from",
)


@dataclass
class ClassifierSettings:
    """Data, model and optimisation settings shared by every classifier run."""

    # data
    data_dir: str = option(help="build_captions.py output folder (train split trains, validation selects)")
    synthetic_dir: str | None = option(None, help="generate.py output folder or its manifest.csv")
    synthetic_ratio: float | None = option(None, help="synthetic images per real training image (default: all)")
    # mixing recipes of a real + synthetic run (--train mixed; compare.py's mixed run)
    synthetic_share: float | None = option(
        None,
        help="share of synthetic images in each batch or epoch (--share_per), drawn anew each time from all of "
        "them; instead of --synthetic_ratio",
    )
    share_per: str = option("epoch", help="where --synthetic_share holds", choices=SHARE_PER)
    synthetic_weight: float = option(1.0, help="loss weight of each synthetic image (a real image weighs 1)")
    swap_probability: float = option(
        0.0,
        help="each epoch, each real training image is replaced with this probability by one of its own synthetic "
        "variants (the manifest's 'source' column, generate.py --mode augment); synthetic images enter only so",
    )
    finetune_epochs: int = option(
        0, help="two stages: after --epochs on the --train set, this many more on real images only"
    )
    init_from: str | None = option(
        None,
        help="start from the weights of this LesionGen classifier checkpoint (a best/last.safetensors file), e.g. one "
        "trained on synthetic images only, then train the whole schedule; compare.py's 'synthetic' means its own "
        "synthetic-only run's last checkpoint",
    )
    synthetic_bn: bool = option(
        False,
        help="ResNet18: separate BatchNorm statistics for synthetic images (AdvProp's auxiliary BatchNorm), the "
        "real ones for real images and at evaluation; refused for ViT, whose LayerNorm keeps no running statistics",
    )
    skip_missing: bool = option(False, help="skip (and count) images listed but not on disk instead of stopping")
    allow_missing_classes: bool = option(False, help="train even if a validation class has no training images")
    # model
    model: str = option(
        "resnet18", help="any timm architecture (resnet50, convnext_tiny, efficientnet_b0, ...), or vit for --vit_name"
    )
    vit_name: str = option("vit_small_patch16_224", help="timm ViT variant for --model vit")
    pretrained: bool = option(
        True, help="start from ImageNet weights (timm's, from the Hugging Face cache or Hub); false: random weights"
    )
    image_size: int = option(224, help="square input size in pixels", aliases=("--resolution",))
    # optimisation
    epochs: int = option(20, help="training epochs")
    batch_size: int = option(64, help="images per step")
    lr: float = option(1e-3, help="AdamW learning rate (cosine decay)", aliases=("--learning_rate",))
    weight_decay: float = option(1e-4, help="AdamW weight decay")
    augment: str = option("standard", help="training augmentation", choices=tuple(AUGMENTATIONS))
    tone_augment: float = option(
        0.0,
        help="probability that a training image's skin around its lesion is recoloured to a tone drawn from every "
        "ITA band (a CIELAB shift, no model; the lesion's pixels kept): --variant_skin_tones without a diffusion "
        "model, so that real only can have it too",
    )
    balance: str = option("sampler", help="class balancing: weighted sampling or loss weights", choices=BALANCING)
    amp: bool = option(False, help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    # runs
    folds: int = option(1, help="K >= 2: K-fold cross-validation on the train split, grouped by lesion")
    seed: int = option(0, help="seed for weights, sampling, augmentation and folds")
    resume_from_checkpoint: str | None = option(
        "latest", help="'latest' resumes output_dir/last.safetensors; none starts fresh"
    )
    num_workers: int = option(2, help="DataLoader worker processes")
    device: str = option(AUTO, help="auto (cuda when available), cpu, cuda, cuda:1 ...")

    def __post_init__(self) -> None:
        if self.synthetic_ratio is not None and not 0 < self.synthetic_ratio < float("inf"):  # nan too
            raise InputError(
                "--synthetic_ratio", f"must be a positive number, got {self.synthetic_ratio}", "e.g. 1.0, or omit it"
            )
        self.check_recipe()
        for name in ("epochs", "batch_size", "folds"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name}", f"must be at least 1, got {getattr(self, name)}", "pass a positive number"
                )
        if self.num_workers < 0:
            raise InputError(
                "--num_workers", f"must be 0 or more, got {self.num_workers}", "0 loads images in this process"
            )
        if not 0 <= self.tone_augment <= 1:  # false for nan too
            raise InputError("--tone_augment", f"must lie in [0, 1], got {self.tone_augment}", "e.g. 0.5")
        if self.image_size < 16:
            raise InputError("--image_size", f"{self.image_size} px is too small", "use 16 or more")
        if not 0 < self.lr < float("inf"):  # false for nan too
            raise InputError("--lr", f"must be a positive number, got {self.lr}", "e.g. 1e-3")

    def check_recipe(self) -> None:
        """The mixing options: in range, and one way of drawing synthetic images at a time."""
        if self.synthetic_share is not None and not 0 < self.synthetic_share < 1:
            raise InputError("--synthetic_share", f"must lie between 0 and 1, got {self.synthetic_share}", "e.g. 0.3")
        if self.synthetic_share is not None and self.share_per == "batch":
            k = round(self.synthetic_share * self.batch_size)
            if not 0 < k < self.batch_size:
                raise InputError(
                    "--synthetic_share",
                    f"{self.synthetic_share} of --batch_size {self.batch_size} is {k} synthetic images a batch",
                    "choose a share that leaves at least one real and one synthetic image per batch",
                )
        if not 0 <= self.swap_probability <= 1:
            raise InputError("--swap_probability", f"must lie in [0, 1], got {self.swap_probability}", "e.g. 0.3")
        chosen = [
            flag
            for flag, on in (
                ("--synthetic_ratio", self.synthetic_ratio is not None),
                ("--synthetic_share", self.synthetic_share is not None),
                ("--swap_probability", self.swap_probability > 0),
            )
            if on
        ]
        if len(chosen) > 1:
            raise InputError(" and ".join(chosen), "each decides how many synthetic images train", "pass one of them")
        if self.synthetic_weight < 0:
            raise InputError("--synthetic_weight", f"must be 0 or more, got {self.synthetic_weight}", "e.g. 0.5")
        if self.finetune_epochs < 0:
            raise InputError("--finetune_epochs", f"must be 0 or more, got {self.finetune_epochs}", "e.g. 5")
        if self.synthetic_bn and self.model != "resnet18":
            raise InputError(
                "--synthetic_bn",
                f"--model {self.model} has no BatchNorm: LayerNorm normalises each image alone and keeps no running "
                "statistics, so synthetic images cannot shift the real ones'",
                "drop --synthetic_bn, or use --model resnet18",
            )

    @property
    def total_epochs(self) -> int:
        """Both stages: the --train set's epochs, then the real-only fine-tuning ones."""
        return self.epochs + self.finetune_epochs


@dataclass
class ClassifyConfig(ClassifierSettings):
    """Train a skin-lesion classifier on real, synthetic or mixed images."""

    train: str = option("real", help="which images train the model", choices=TRAIN_MODES)
    output_dir: str = option("weights", help="where checkpoints, logs and metrics go")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train != "real" and not self.synthetic_dir:
            raise InputError(
                "--synthetic_dir", f"--train {self.train} needs synthetic images", "pass generate.py's output folder"
            )
        recipes = {
            "--synthetic_share": self.synthetic_share is not None,
            "--swap_probability": self.swap_probability > 0,
            "--synthetic_weight": self.synthetic_weight != 1,
        }
        mixing = [flag for flag, on in recipes.items() if on]
        if mixing and self.train != "mixed":
            raise InputError(
                mixing[0], f"mixes synthetic and real images, but --train is {self.train}", "pass --train mixed"
            )
        staged = [
            flag
            for flag, on in (("--finetune_epochs", self.finetune_epochs), ("--synthetic_bn", self.synthetic_bn))
            if on
        ]
        if staged and self.train == "real":
            raise InputError(staged[0], "acts on synthetic images, and --train real has none", "pass --train mixed")
        if self.synthetic_bn and self.train == "synthetic" and not self.finetune_epochs:
            raise InputError(
                "--synthetic_bn",
                "with --train synthetic and no real epochs, the real BatchNorm statistics used at evaluation never train",
                "add --finetune_epochs, or use --train mixed",
            )


def config_from_dict(values: dict) -> ClassifyConfig:
    """Rebuild a stored config, ignoring fields this version no longer has."""
    known = ClassifyConfig.__dataclass_fields__
    return ClassifyConfig(**{k: v for k, v in values.items() if k in known})
