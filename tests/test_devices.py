import pytest
import torch

from eclipse_stream.devices import resolve_device
from eclipse_stream.errors import DeviceError


@pytest.mark.parametrize("auto", [None, "", "auto"])
def test_automatic_choice_is_cuda_when_present_else_cpu(auto, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(auto) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(auto) == torch.device("cuda", 1)  # under torchrun: this process's GPU


def test_explicit_device_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == torch.device("cuda", 2)  # plain cuda: this process's GPU, with an index


@pytest.mark.parametrize("name, says", [
    ("gpu0", "is not a device PyTorch knows"), ("tpu", "is not a device PyTorch knows"),
    ("nonsense", "is not a device PyTorch knows"), ("meta", "holds no data"),
    ("cuda", "CUDA is not available here"), ("cuda:0", "CUDA is not available here"),
    ("cuda:7", "CUDA is not available here")])
def test_devices_that_cannot_compute_here_are_named_errors(name, says, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=f"device '{name}'.*{says}.*devices available here: cpu$") as e:
        resolve_device(name)
    assert e.value.exit_code == 2 and isinstance(e.value, ValueError)


def test_a_gpu_index_past_the_last_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"there is no cuda:7, this machine has 1 CUDA device\(s\); devices "
                                          r"available here: cpu, cuda:0"):
        resolve_device("cuda:7")
