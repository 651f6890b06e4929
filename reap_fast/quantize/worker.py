"""The quantization child: ``python -m reap_fast.quantize.worker REQUEST.json``, started by
:func:`reap_fast.quantize.child.run_quantize_subprocess` (not a command for users: ``reap-fast quantize`` is)."""

from __future__ import annotations

import sys

from ..children import child_main, read_request
from ..config.quantize import QuantConfig
from ..fileio import load_texts_file
from ..logs import configure_logging
from .autoround import quantize_w4a16


def main(argv: list[str] | None = None) -> int:
    """Run the request in the JSON file ``argv[0]``; returns the exit code (0, or a ReapFastError's: 2 for a
    QuantizationError)."""
    request = read_request(argv, "python -m reap_fast.quantize.worker", "The quantization child of reap-fast.")
    configure_logging("%(levelname)s %(name)s: %(message)s")

    def work() -> None:
        texts = load_texts_file(request["texts_file"])
        print(quantize_w4a16(request["model_dir"], request["output_dir"], texts, QuantConfig(**request["config"])))

    # SIGTERM unwinds (staging folders removed); errors reach the parent by the children protocol
    return child_main(work, "reap-fast quantize")


if __name__ == "__main__":
    sys.exit(main())
