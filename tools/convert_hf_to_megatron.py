#!/usr/bin/env python
"""Convert a Hugging Face checkpoint to a megatron distributed checkpoint (streaming, CPU).

Same as `megarl convert hf-to-megatron`; see `--help` and docs/conversion.md.
"""

import sys

from megarl.cli_convert import main

if __name__ == "__main__":
    sys.exit(main("hf-to-megatron"))
