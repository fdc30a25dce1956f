import pytest
import torch

from eclipse_stream.devices import resolve_device


@pytest.mark.parametrize("auto", [None, "", "auto"])
def test_automatic_choice_is_cuda_when_present_else_cpu(auto, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(auto) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(auto) == torch.device("cuda", 1)  # under torchrun: this process's GPU


def test_explicit_device_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    with pytest.raises(RuntimeError):
        resolve_device("gpu0")
