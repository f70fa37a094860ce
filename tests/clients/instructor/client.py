"""instructor's default mode (``Mode.TOOLS``), unmodified, against ccwrap-trio: one structured
answer through a forced function call. Run by ``tests/clients/test_instructor.py`` with the
Python of ``tests/clients/instructor/.venv``; prints one JSON line."""

import json
import sys

import instructor
import openai
import pydantic


class City(pydantic.BaseModel):
    name: str
    population: int


client = instructor.from_openai(
    openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0), mode=instructor.Mode.TOOLS
)
city, completion = client.chat.completions.create_with_completion(
    model="haiku",
    response_model=City,
    max_retries=0,  # instructor's own validation retries: one answer must do
    messages=[{"role": "user", "content": "Paris as a city [standin:call=City]"}],
)
message = completion.choices[0].message
print(json.dumps({
    "city": city.model_dump(),
    "finish_reason": completion.choices[0].finish_reason,
    "tool_calls": [call.function.name for call in message.tool_calls or []],
    "versions": {"instructor": instructor.__version__, "openai": openai.__version__},
}))
