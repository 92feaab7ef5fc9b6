#!/usr/bin/env python
"""Convert VPMoE checkpoints to and from Hugging Face format (same as ``vpmoe convert``).

    python tools/convert_checkpoint.py to-hf CKPT OUT_DIR [--dtype bf16]
    python tools/convert_checkpoint.py from-hf HF_DIR CKPT
"""

import sys

from megatron_vpmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
