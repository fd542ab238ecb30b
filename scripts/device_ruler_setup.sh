#!/usr/bin/env bash
# On the GPU machine, before a RULER-style run: unpack what .gpu/ carried
# (CONTRIBUTING.md, "The RULER-style suite on the GPU machine").
set -eux
rm -rf /root/src && mkdir -p /root/src /root/smol /root/infcache
tar -xzf .gpu/src.tgz -C /root/src
tar -xJf .gpu/haystacks.tar.xz -C /root/infcache
[ -f .gpu/smol.partaa ] && cp .gpu/smol.partaa /root/smol/
[ -f .gpu/smol.partab ] && cp .gpu/smol.partab /root/smol/
if [ -f /root/smol/smol.partaa ] && [ -f /root/smol/smol.partab ]; then
  cat /root/smol/smol.parta? > /root/smol/SmolLM2-135M-Instruct.Q4_1.gguf && rm /root/smol/smol.parta?
fi
python3 -m pip install -q --no-index --find-links .gpu/wheels pydantic omegaconf gguf pyyaml 2>&1 | tail -2
python3 -c "import torch, transformers, gguf, pydantic; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
ls -la /root/smol
