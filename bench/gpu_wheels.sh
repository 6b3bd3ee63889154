#!/usr/bin/env bash
# The Python 3.12 wheels bench/gpu_finetune.sh needs beyond a lent GPU machine's image (torch, accelerate, numpy,
# pyarrow, hf-hub 1.x are there; emgate's pydantic and cryptography, TRL, datasets and Liger are not, and
# transformers/peft/tokenizers are pinned to the train image's versions), downloaded here into .whl/ (git-ignored
# through .git/info/exclude). The device call then carries .whl and starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit 3; bash bench/gpu_finetune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
pins() { grep -E "^($1)==" images/train/requirements.txt; }
# transformers, peft, tokenizers, pydantic and cryptography as the train image pins them
wanted=($(pins 'transformers|peft|tokenizers|pydantic|pydantic-core|annotated-types|typing-inspection|typing-extensions|cryptography|cffi|pycparser|regex')
        trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${wanted[@]}"
du -sh .whl
