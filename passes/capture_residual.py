"""CaptureResidualPass (calibration graph): the residual stream around each attention.

Matches, for every canonical ``maskkv::attention`` node, the residual add that closes its
sub-layer: following the attention output forward through single-use nodes (reshapes, the
output projection, dropout), the first ``add`` whose other operand does not depend on the
attention. That operand is ``h_in`` (the stream entering the sub-layer) and the add is
``h_out``. Inserts nothing; appends ``(h_in, h_out)`` of every layer to the graph outputs.

Refuses (in ``skipped``) a site whose output branches before reaching an add: the
sub-layer boundary is then not provable, and calibration stops with that message.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .base import GraphPass, PassResult, graph_outputs, is_call, set_outputs
from .find_attention import attention_sites

ADD_TARGETS = (operator.add, torch.add, operator.iadd)


def _depends_on(node, target: fx.Node, limit: int = 10_000) -> bool:
    stack, seen = [node], set()
    while stack and len(seen) < limit:
        current = stack.pop()
        if current is target:
            return True
        if isinstance(current, fx.Node) and current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


class CaptureResidualPass(GraphPass):
    name = "CaptureResidualPass"

    def run(self, gm: fx.GraphModule) -> PassResult:
        pairs: list[fx.Node] = []
        skipped: list[str] = []
        for node, site in attention_sites(gm):
            current = node
            while True:
                users = list(current.users)
                if len(users) != 1:
                    skipped.append(
                        f"{site.module_path}: attention output branches at {current.name} "
                        "before the residual add"
                    )
                    break
                user = users[0]
                if is_call(user, *ADD_TARGETS):
                    other = user.args[1] if user.args[0] is current else user.args[0]
                    if isinstance(other, fx.Node) and not _depends_on(other, node):
                        pairs += [other, user]
                        break
                current = user
        set_outputs(gm, graph_outputs(gm) + tuple(pairs))
        return PassResult(
            self.name, matches=len(pairs) // 2, changed=bool(pairs), skipped=tuple(skipped)
        )
