from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import tempfile
import time
from pathlib import Path

from quantkit.errors import InputError, ModelError

LOOPBACK = "127.0.0.1"


def port_number(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {v}")
    return v


def read_model_bytes(path: Path) -> bytearray:
    """The model file's bytes; ModelError names the file when it is missing or unreadable."""
    from quantkit._io import input_file

    input_file(path, "model file", ModelError)
    try:
        data = bytearray(path.read_bytes())
    except OSError as err:
        raise ModelError(f"cannot read model file {str(path)!r}: {err.strerror or err}") from err
    if not data:
        raise ModelError(f"model file {str(path)!r} is empty")
    return data


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class View:
    """Open a model (FP32 or Q/DQ ONNX) in Netron, in the web browser; runs until Ctrl-C.

    Serves the model with Netron's own web server (the `netron` package:
    pip install 'quantkit[view]') and prints the URL. The model is only read and sent to the
    browser, never run or unpickled. Only the model file is served, not the files beside it.
    Ctrl-C stops the server and exits with status 0.

    On a remote machine, keep the default loopback address and forward the port:
      ssh -L 8080:127.0.0.1:8080 HOST   then   quantkit view model.onnx --port 8080 --no-browser

    example:
      quantkit view out/resnet.int8.onnx
    """

    name = "view"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL", help="the model file (.onnx, or any format Netron reads)")
        parser.add_argument("--port", type=port_number, default=None,
                            help="port to listen on (default: 8080 if free, else another free port; 0: any free port)")
        parser.add_argument("--host", default=LOOPBACK, metavar="ADDR",
                            help=f"address to listen on (default {LOOPBACK}: this machine only). Any other "
                            "address, such as 0.0.0.0, EXPOSES THE MODEL TO THE NETWORK: whoever reaches this "
                            "machine can download it")
        parser.add_argument("--no-browser", action="store_true",
                            help="do not open a web browser (print the URL only; for remote machines)")

    def run(self, args: argparse.Namespace) -> int:
        from quantkit._deps import require

        path = Path(args.model)
        data = read_model_bytes(path)
        netron = require("netron")
        # Netron serves every file under the model's folder at /data/<name>; handing it the bytes
        # under a name in an empty private folder keeps the files beside the model unreachable.
        # SIGTERM (kill, a service manager) ends it as Ctrl-C does, so the private copy of the model
        # is removed too (the server thread is a daemon: without this the process died with it left);
        # and SIGINT does even when started from a shell's background job, which ignores it
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with tempfile.TemporaryDirectory(prefix="quantkit-view-") as private:
            try:
                address = netron.serve(os.path.join(private, path.name), data, address=(args.host, args.port),
                                       browse=not args.no_browser)
            except (OSError, ValueError) as err:  # port taken, unknown host, no free port
                where = f"{args.host}:{args.port}" if args.port else args.host
                raise InputError(f"Netron cannot listen on {where}: {getattr(err, 'strerror', None) or err}",
                                 hint="choose another --port (0 picks any free one) or --host") from err
            # from here on the server thread runs: whatever ends this process (Ctrl-C while a line
            # below is printed, too) stops it first, or the process would wait for it forever
            try:
                url = f"http://{address[0]}:{address[1]}/"
                print(f"Netron is serving {path} at {url}", flush=True)
                if not _is_loopback(args.host):
                    print(f"  note: listening on {args.host}: the model can be downloaded from the network", flush=True)
                print("  press Ctrl-C to stop", flush=True)
                while netron.status(address):
                    time.sleep(0.2)
            except KeyboardInterrupt:
                pass
            finally:
                netron.stop(address)
        print("stopped", flush=True)
        return 0
