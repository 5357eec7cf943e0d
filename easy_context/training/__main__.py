"""``python -m easy_context.training rope-base``: print the RoPE base for a target context length (used by
``train_scripts/``)::

    python -m easy_context.training rope-base --formula scaling-law --original-base 1e4 \\
        --original-length 4096 --target-length 524288 [--head-dim 128]
"""

import sys

from .rope import main

if __name__ == "__main__":
    sys.exit(main())
