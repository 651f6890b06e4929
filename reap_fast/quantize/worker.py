"""The quantization child: ``python -m reap_fast.quantize.worker REQUEST.json``, started by
:func:`reap_fast.quantize.child.run_quantize_subprocess` (not a command for users: ``reap-fast quantize`` is)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..children import exit_on_sigterm
from ..config.quantize import QuantConfig
from ..errors import ReapFastError
from ..logs import configure_logging
from .autoround import quantize_w4a16
from .child import EXIT_QUANT_ERROR, load_texts_file


def main(argv: list[str] | None = None) -> int:
    """Run the request in the JSON file ``argv[0]``; returns the exit code (0, or 2 for a QuantizationError)."""
    (request_path,) = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(request_path).read_text())
    exit_on_sigterm()  # a terminated child still removes its staging folders
    configure_logging("%(levelname)s %(name)s: %(message)s")

    def report(kind: str, message: str) -> None:
        if request.get("error_file"):
            Path(request["error_file"]).write_text(json.dumps({"type": kind, "message": message}))

    try:
        texts = load_texts_file(request["texts_file"])
        out = quantize_w4a16(request["model_dir"], request["output_dir"], texts, QuantConfig(**request["config"]))
    except ReapFastError as error:
        report("QuantizationError", str(error))
        print(f"reap-fast quantize: error: {error}", file=sys.stderr)
        return EXIT_QUANT_ERROR
    except Exception as error:
        report(type(error).__name__, f"{type(error).__name__}: {error}")
        raise
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
