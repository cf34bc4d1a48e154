"""Quantization-aware training: fake quantization calibrated with quantkit's collectors and
range methods, fine-tuned with straight-through gradients, exported as Q/DQ ONNX.

    import quantkit.qat as qq
    qmodel = qq.prepare(model, qq.QatConfig())
    qq.calibrate(qmodel, loader, method="entropy")
    train(qmodel, ...)
    qq.export_onnx(qmodel, "model.qat.onnx", example_input, dynamic_batch=True)

Needs PyTorch (``pip install 'quantkit[torch]'``).
"""

from quantkit._deps import require

require("torch")

from quantkit.qat.calibrate import QatCalibration, calibrate, collect  # noqa: E402
from quantkit.qat.debug import QuantizerError, quantizer_errors  # noqa: E402
from quantkit.qat.export import check_calibrated, export_onnx, fold_batchnorm  # noqa: E402
from quantkit.qat.modules import QUANT_TYPES, QuantMixin  # noqa: E402
from quantkit.qat.prepare import QatConfig, prepare, quantizers  # noqa: E402
from quantkit.qat.quantizer import TensorQuantizer  # noqa: E402

__all__ = [
    "QatCalibration", "QatConfig", "QUANT_TYPES", "QuantMixin", "TensorQuantizer", "calibrate", "check_calibrated",
    "collect", "export_onnx", "fold_batchnorm", "prepare", "quantizer_errors", "quantizers", "QuantizerError",
]
