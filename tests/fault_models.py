"""Small ONNX quality models (built with ``onnx``) that misbehave at run time on particular inputs.

Both compute quality = mean of the normalised crop, so ordinary crops score normally; a trigger crop is
one whose every pixel is white (or black): no photograph is. The trigger makes the graph fail (an
out-of-range Gather: ONNX Runtime raises), stall (a Loop whose trip count the input sets) or answer NaN
for that crop alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NEAR_ONE = 0.99  # a normalised pixel of 255 is ~1.0, of 0 is ~-1.0


def _const(name: str, value: object, dtype: type = np.float32) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype), name))


def _trigger(trigger: str) -> list[onnx.NodeProto]:
    """Nodes computing ``hits`` (int64 scalar): the number of all-white (or all-black) crops in the batch."""
    if trigger == "white":  # every pixel near +1: the crop's minimum is
        reduce, compare = "ReduceMin", "Greater"
    elif trigger == "black":  # every pixel near -1: the crop's maximum is
        reduce, compare = "ReduceMax", "Less"
    else:
        raise ValueError(trigger)
    return [
        helper.make_node(reduce, ["input"], ["per_crop"], axes=[1, 2, 3], keepdims=0),
        _const("thr", NEAR_ONE if trigger == "white" else -NEAR_ONE),
        helper.make_node(compare, ["per_crop", "thr"], ["is_hit"]),
        helper.make_node("Cast", ["is_hit"], ["hit_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["hit_i"], ["hits"], keepdims=0),
    ]


def _quality(extra: str) -> list[onnx.NodeProto]:
    """quality [N,1] = mean of the crop + ``extra`` (a scalar 0 that depends on the trigger path)."""
    return [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["mean2"], axis=1),
        helper.make_node("Add", ["mean2", extra], ["quality"]),
    ]


def _save(nodes: list[onnx.NodeProto], name: str, path: Path) -> Path:
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["N", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def build_failing_model(path: Path, trigger: str = "white") -> Path:
    """Fails (ONNX Runtime error) on any batch holding a trigger crop: Gather index 7 of a 1-element table."""
    nodes = [*_trigger(trigger), _const("seven", 7, np.int64), helper.make_node("Min", ["hits", "one"], ["any"]),
             helper.make_node("Mul", ["any", "seven"], ["index"]), _const("table", [0.0]),
             helper.make_node("Gather", ["table", "index"], ["zero"], axis=0), *_quality("zero")]
    nodes.insert(len(_trigger(trigger)), _const("one", 1, np.int64))
    return _save(nodes, "fail_on_" + trigger, path)


def build_stalling_model(path: Path, iterations_per_hit: int, trigger: str = "white") -> Path:
    """Runs a Loop of ``iterations_per_hit`` x hits^4 steps (hits: trigger crops in the batch): one trigger
    crop stalls a while, a few stall practically forever, whatever the machine's speed."""
    body = helper.make_graph(
        [_const("step", 1.0), helper.make_node("Add", ["acc_in", "step"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])])
    nodes = [*_trigger(trigger), _const("per_hit", iterations_per_hit, np.int64),
             helper.make_node("Mul", ["hits", "hits"], ["hits2"]), helper.make_node("Mul", ["hits2", "hits2"], ["hits4"]),
             helper.make_node("Mul", ["hits4", "per_hit"], ["trips"]), _const("go", True, np.bool_),
             _const("start", 0.0), helper.make_node("Loop", ["trips", "go", "start"], ["spun"], body=body),
             _const("nothing", 0.0), helper.make_node("Mul", ["spun", "nothing"], ["zero"]), *_quality("zero")]
    return _save(nodes, "stall_on_" + trigger, path)


def build_nan_model(path: Path) -> Path:
    """Answers NaN for an all-white crop and the normal value for every other crop of the same batch:
    quality + 0 * sqrt(NEAR_ONE - the crop's minimum), whose root is of a negative number only for white."""
    nodes = [helper.make_node("ReduceMin", ["input"], ["low"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Flatten", ["low"], ["low2"], axis=1), _const("thr", NEAR_ONE),
             helper.make_node("Sub", ["thr", "low2"], ["room"]), helper.make_node("Sqrt", ["room"], ["root"]),
             _const("nothing", 0.0), helper.make_node("Mul", ["root", "nothing"], ["zero"]), *_quality("zero")]
    return _save(nodes, "nan_on_white", path)

