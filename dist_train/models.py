"""The recipe's CIFAR-10 Net, torchvision classifiers by name, and unwrapping of DDP / torch.compile."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_train.config import UserError
from dist_train.errors import first_line

NUM_CLASSES = 10
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class Net(nn.Module):
    """The network of PyTorch's CIFAR-10 tutorial and of the general-checkpoint recipe."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def torchvision_model_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    if name != "net" and name not in torchvision_model_names():
        raise UserError(f"unknown model {name!r}: use 'net' or a torchvision classification model "
                        f"such as resnet18 (torchvision.models.list_models() names them)")


def build_model(name: str) -> nn.Module:
    """A freshly initialised model with NUM_CLASSES outputs."""
    check_model_name(name)
    if name == "net":
        return Net()
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    return replace_global_average_pools(model)


def check_model_takes(name: str, image_shape: tuple[int, ...]) -> None:
    """A torchvision model made for larger images (ViT's fixed 224, AlexNet's and Inception's
    pooling) or with auxiliary outputs in training (GoogLeNet) failed at its first step with a
    traceback, exit 1, which a relaunch loop retries. Found here on the meta device (shapes only:
    no weights are made), before the run directory is touched: one line, exit 2."""
    model = _on_meta(name)
    if model is None:
        return
    try:
        out = _step_on_meta(model, 2, image_shape)
    except Exception as error:
        reason = first_line(error)
    else:
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (2, NUM_CLASSES):
            return
        reason = f"in training it returns {type(out).__name__}, not a tensor of {NUM_CLASSES} logits per image"
    raise UserError(f"--model {name} cannot train on {'x'.join(map(str, image_shape))} images ({reason}); "
                    "ResNets, ConvNeXts, EfficientNets, VGGs and Swins can, among others")


def one_image_problem(name: str, image_shape: tuple[int, ...]) -> str | None:
    """Why the model cannot take a training step on a batch of one image (BatchNorm over a single
    value per channel, as a ResNet's last layers see on 32x32 images), or None."""
    model = _on_meta(name)
    if model is None:
        return None
    try:
        _step_on_meta(model, 1, image_shape)
    except Exception as error:
        return first_line(error)
    return None


def _step_on_meta(model: nn.Module, batch_size: int, image_shape: tuple[int, ...]):
    """The training-mode output for a batch of zeros, shapes only."""
    with torch.device("meta"), torch.no_grad():
        return model.train()(torch.zeros(batch_size, *image_shape))


def _on_meta(name: str) -> nn.Module | None:
    """The model on the meta device (no weights made); None for Net (it takes anything) or a model
    the meta device cannot build (RegNet): its first step tells."""
    if name == "net":
        return None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GoogLeNet's and Inception's FutureWarning on init: noise here
            return build_model(name)
    except UserError:
        raise
    except Exception:
        return None


class GlobalAvgPool(nn.Module):
    """AdaptiveAvgPool2d(1) as a mean over height and width: the same values, and a backward
    that CUDA computes deterministically (AdaptiveAvgPool2d's CUDA backward has no deterministic
    implementation, so deterministic mode would refuse ResNets and their kin)."""

    def forward(self, x):
        return x.mean(dim=(-2, -1), keepdim=True)


def replace_global_average_pools(model: nn.Module) -> nn.Module:
    """Swap every AdaptiveAvgPool2d with output size 1 for GlobalAvgPool (no parameters: the
    state_dict is unchanged)."""
    for name, child in model.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
            setattr(model, name, GlobalAvgPool())
        else:
            replace_global_average_pools(child)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Keys without the 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes."""
    cleaned = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        cleaned[key] = value
    return cleaned
