"""Run by the vLLM venv's python: validate response bodies against vLLM's own pydantic models.

stdin: a JSON list of {"what", "model", "body"}; stdout: {"problems": [...] (empty = all valid),
"notes": [top-level keys vLLM would also write, for information]}.
A problem is a validation error, or a key vLLM's model does not declare (its models allow extras,
so a misnamed field such as `reasoning_content` would otherwise pass). Imports only vLLM.
"""
from __future__ import annotations

import json
import sys

from pydantic import BaseModel, ValidationError

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse, ChatCompletionStreamResponse
from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionStreamResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelList
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse, TokenizeResponse

MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m
    for m in (ChatCompletionResponse, ChatCompletionStreamResponse, CompletionResponse, CompletionStreamResponse,
              ErrorResponse, ModelList, TokenizeResponse, DetokenizeResponse)
}


def extras(obj: object, path: str) -> list[str]:
    """Paths of keys no model on the way declares (pydantic's model_extra, recursively)."""
    out: list[str] = []
    if isinstance(obj, BaseModel):
        for k in (obj.model_extra or {}):
            out.append(f"{path}.{k}")
        for name in type(obj).model_fields:
            out += extras(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += extras(v, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += extras(v, f"{path}[{k!r}]")
    return out


def main() -> int:
    problems, notes = [], []
    for item in json.load(sys.stdin):
        model = MODELS[item["model"]]
        try:
            obj = model.model_validate(item["body"])
        except ValidationError as e:
            problems.append({"what": item["what"], "error": str(e)})
            continue
        unknown = extras(obj, item["model"])
        if unknown:
            problems.append({"what": item["what"], "unknown_keys": unknown})
        if not item["model"].endswith("StreamResponse"):  # streams are dumped exclude_unset: keys vary
            missing = sorted(set(obj.model_dump()) - set(item["body"]))
            if missing:
                notes.append({"what": item["what"], "keys vLLM's model_dump writes that the body lacks": missing})
    json.dump({"problems": problems, "notes": notes}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
