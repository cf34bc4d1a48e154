"""Finding INT8 accuracy loss: layer-wise error of a Q/DQ model against its FP32 model.

``layerwise_error(fp32, int8, batches)`` -> ``DebugReport`` (``quantkit debug`` on the command line).
"""

from quantkit.debug.layerwise import DebugReport, PointError, QdqPoint, WeightError, layerwise_error, qdq_points

__all__ = ["DebugReport", "PointError", "QdqPoint", "WeightError", "layerwise_error", "qdq_points"]
