"""`inf_llm.engine.pacing.ChunkPacer`: on a CPU every chunk is done when issued; on a GPU the host runs one
chunk ahead (the chunk before is done after `issued`, the last after `drain`), with the GPU timeline's times."""

from __future__ import annotations

import pytest
import torch

from inf_llm.engine.pacing import ChunkPacer


def test_cpu_chunks_are_done_when_issued():
    pacer = ChunkPacer(torch.device("cpu"), timed=True)
    assert pacer.drain() is None and pacer.seconds() == []
    assert pacer.issued(8) == 8
    assert pacer.issued(16) == 16
    assert pacer.drain() == 16
    seconds = pacer.seconds()
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)
    with pytest.raises(ValueError, match="no times"):
        ChunkPacer(torch.device("cpu")).seconds()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_host_runs_one_chunk_ahead():
    """A chunk of GPU work (~50 ms of matrix products) per `issued`: the previous chunk is done when it
    returns, the current one is not yet; `drain` waits for it; times follow the GPU's work."""
    a = torch.randn(4096, 4096, device="cuda")
    pacer = ChunkPacer(torch.device("cuda"), timed=True)

    def chunk():
        for _ in range(40):
            a @ a

    chunk()
    assert pacer.issued(1) is None
    chunk()
    assert pacer.issued(2) == 1
    assert not pacer._marks[-1].query()  # the second chunk still runs: the host did not wait for it
    assert pacer.drain() == 2
    seconds = pacer.seconds()
    assert len(seconds) == 2 and all(s > 0.005 for s in seconds)
