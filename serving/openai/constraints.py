"""What a chat request asks the decoder to obey, checked together before anything runs.

``response_format``, vLLM's ``structured_outputs`` extra and the tools (with ``tool_choice``) share one budget
of schema bytes (``limits.max_schema_bytes``) and exclude each other in ways only the whole request shows, so
they are checked here, once, when the body is parsed (:func:`mmrag.serving.pipeline.parse_chat_body`), rather
than inside the request model: this module needs both :mod:`.structured` and :mod:`.tools`, which need the
request model's types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError
from mmrag.serving.openai.structured import SchemaBudget, check_schema, compact_json
from mmrag.serving.openai.tools import check_tools

if TYPE_CHECKING:
    from mmrag.serving.openai.protocol import ChatCompletionRequest

__all__ = ["check_request_schemas"]


def check_request_schemas(request: ChatCompletionRequest, limits: LimitsConfig) -> None:
    """Schemas, tool names and how the constraints combine; every refusal names the field to change."""
    budget = SchemaBudget(limits.max_schema_bytes)
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.json_schema
        if schema is not None:
            param = "response_format.json_schema.schema"
            budget.spend(compact_json(schema), param)
            check_schema(schema, param)
    extra = request.structured_outputs
    if extra is not None:
        if response_format is not None and response_format.type != "text":
            raise InvalidRequestError(
                "structured_outputs: send response_format or structured_outputs, not both", param="structured_outputs"
            )
        if extra.json_schema is not None:
            budget.spend(compact_json(extra.json_schema), "structured_outputs.json")
            check_schema(extra.json_schema, "structured_outputs.json")
        else:
            spec = extra.regex or extra.grammar or compact_json(extra.choice)
            budget.spend(spec, "structured_outputs")
    check_tools(request, budget)
