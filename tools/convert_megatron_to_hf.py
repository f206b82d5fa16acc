#!/usr/bin/env python
"""Convert a megatron distributed checkpoint to Hugging Face (streaming, one process, CPU).

Same as `megarl convert megatron-to-hf`; see `--help` and docs/conversion.md.
"""

import sys

from megarl.cli_convert import main

if __name__ == "__main__":
    sys.exit(main("megatron-to-hf"))
