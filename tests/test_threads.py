"""threads.py: one CPU thread for small work, and the calibrated CPU forward of a feature pre-pass."""

import timm
import torch

from transfer_cli.threads import CHUNK_PIXELS, CalibratedCpuForward, cpu_threads_for, small_work


def test_small_work_runs_on_one_thread_and_the_setting_comes_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_threads_for(torch.device("cpu"), 1000):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with cpu_threads_for(torch.device("cpu"), 2**40):  # large work keeps torch's threads
            assert torch.get_num_threads() == 2
        assert not small_work(torch.device("meta"), 1)  # only a CPU
    finally:
        torch.set_num_threads(before)


def test_calibrated_forward_gives_the_networks_outputs_and_settles_on_one_way():
    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).eval()
    forward = CalibratedCpuForward(net)
    side = 64
    batch = torch.randn(CHUNK_PIXELS // (side * side) * 2 + 1, 3, side, side)  # more than one chunk
    threads = torch.get_num_threads()
    with torch.no_grad():
        expected = net(batch)
        outputs = [forward(batch) for _ in range(4)]  # warm-up, threads, chunks, then the choice
    assert forward.choice in ("threads", "chunks") and set(forward.per_image) == {"threads", "chunks"}
    assert torch.get_num_threads() == threads
    for out in outputs:
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)
