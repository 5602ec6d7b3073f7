"""A build's memory: the checkpoint's pages handed back (release_pages), on a real safetensors file."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compiler.memory import release_pages


def rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssFile:"))


def test_release_pages_drops_clean_mapped_pages_only(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"clean": torch.randn(2048, 1024), "merged": torch.randn(2048, 1024)}, str(path))  # 8 MiB each
    with safe_open(str(path), framework="pt") as f:
        clean, merged = f.get_tensor("clean"), f.get_tensor("merged")
    expected_clean = clean.clone()
    merged.add_(1.0)  # written in place, as a LoRA merge does: private pages that must survive
    expected_merged = merged.clone()
    own = torch.ones(2**20)  # anonymous memory, not from a file
    clean.sum()  # its pages resident
    before = rss_file_mb()
    released = release_pages(clean, merged, own, clean.numpy().T)
    assert 7.9 * 2**20 < released <= 8 * 2**20  # the clean tensor's whole pages, once, and nothing else
    assert before - rss_file_mb() > 7
    assert torch.equal(clean, expected_clean)  # read back from the file
    assert torch.equal(merged, expected_merged)
    assert torch.equal(own, torch.ones(2**20))

