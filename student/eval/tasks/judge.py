"""An LLM judge behind an OpenAI-compatible endpoint, for the tasks whose answers no rule can score.

VoiceBench's two judge prompts (its api_judge.py), sent as one user turn after its system turn:
    open   AlpacaEval, CommonEval: rate the response 1-5 given the instruction's transcription; the score is the
           number the judge prints (or `[[n]]`)
    qa     SD-QA: is the candidate answer correct given the question and the reference? "Yes" scores 1, else 0
VoiceBench samples its judge at temperature 0.5; here it is 0 (greedy), so a rerun against the same judge
gives the same scores. Any server speaking POST {url}/chat/completions works (vLLM, a hosted API, ...); the key
comes from --judge-key or $OPENAI_API_KEY. Nothing runs without an endpoint: those tasks are skipped.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from diva.errors import UserError

SYSTEM = "You are a helpful assistant who tries to help answer the user's question."
OPEN_PROMPT = """
I need your help to evaluate the performance of several models in the speech interaction scenario. The models will receive a speech input from the user, which they need to understand and respond to with a speech output.
Your task is to rate the model's responses based on the provided user input transcription [Instruction] and the model's output transcription [Response].

Please evaluate the response on a scale of 1 to 5:
1 point: The response is largely irrelevant, incorrect, or fails to address the user's query. It may be off-topic or provide incorrect information.
2 points: The response is somewhat relevant but lacks accuracy or completeness. It may only partially answer the user's question or include extraneous information.
3 points: The response is relevant and mostly accurate, but it may lack conciseness or include unnecessary details that don't contribute to the main point.
4 points: The response is relevant, accurate, and concise, providing a clear answer to the user's question without unnecessary elaboration.
5 points: The response is exceptionally relevant, accurate, and to the point. It directly addresses the user's query in a highly effective and efficient manner, providing exactly the information needed.

Below are the transcription of user's instruction and models' response:
### [Instruction]: {prompt}
### [Response]: {response}

After evaluating, please output the score only without anything else.
You don't need to provide any explanations.
"""  # noqa: E501  (VoiceBench's wording, kept line for line)
QA_PROMPT = """### Question
{prompt}

### Reference answer
{reference}

### Candidate answer
{response}

Is the candidate answer correct based on the question and reference answer?
Please only output a single "Yes" or "No". Do not output anything else."""


class JudgeError(UserError):
    """The judge endpoint failed or answered something that is not a score; the message names it."""


@dataclass(frozen=True)
class Judge:
    url: str  # the API base, e.g. http://127.0.0.1:8001/v1
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0

    def ask(self, prompt: str) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]}  # fmt: skip
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(f"{self.url.rstrip('/')}/chat/completions", json.dumps(body).encode(),
                                         headers)  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"].strip()
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as e:
            raise JudgeError(f"the judge at {self.url} (model {self.model}) failed: {e}") from e

    def rate_open(self, prompt: str, response: str) -> float:
        """1-5: how well `response` answers the spoken instruction `prompt`."""
        said = self.ask(OPEN_PROMPT.replace("{prompt}", prompt).replace("{response}", response))
        match = re.search(r"\[\[(\d+(?:\.\d+)?)\]\]", said) or re.match(r"\s*(\d+(?:\.\d+)?)", said)
        if not match or not 1 <= float(match.group(1)) <= 5:
            raise JudgeError(f"the judge at {self.url} answered {said!r}, not a score from 1 to 5")
        return float(match.group(1))

    def rate_qa(self, prompt: str, reference: str, response: str) -> float:
        """1 when the judge says the candidate answer is correct, else 0."""
        said = self.ask(QA_PROMPT.replace("{prompt}", prompt).replace("{reference}", reference)
                        .replace("{response}", response))  # fmt: skip
        return float(said.lower().startswith("yes"))
