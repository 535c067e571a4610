import pytest
import torch

from rex.runtime import keep_freed_memory

torch.set_num_threads(2)
keep_freed_memory()  # as the pipeline's processes run (rex.runtime); bit-identical results, less system time


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread (several threads spin against each other on a loaded 2-core machine)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def mobilenet_v2():
    """The real torchvision MobileNetV2 with the bundled ImageNet weights."""
    from rex.models import get_model

    return get_model("mobilenet_v2").model.eval()


@pytest.fixture(scope="session")
def imagenet_batch():
    """A few real preprocessed images of the bundled ImageNet sample."""
    from rex.data import get_dataset
    from rex.models import get_model

    entry = get_model("mobilenet_v2").entry
    ds = get_dataset("imagenet_sample", preprocess=entry.preprocess, limit=16)
    return torch.stack([ds[i][0] for i in range(len(ds))])
