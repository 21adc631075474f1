"""The demo `make demo` runs: SmolLM2-135M-Instruct answering a batch of chat questions.

It shows warm-up (every step shape compiled once), continuous batching of a batch of chats,
streaming, and the throughput of the run.
"""
import time

from infercept_jax import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "What is 12 times 12?",
    "Name three planets of the solar system.",
    "How do I reverse a list in Python?",
    "What does a compiler do?",
]


def main() -> None:
    start = time.perf_counter()
    llm = LLM("smollm2-135m", max_model_len=2048, kv_cache_memory_gb=1.0)
    print(f"loaded and warmed up in {time.perf_counter() - start:.1f} s "
          f"({llm.warmup_shapes} step shapes compiled in {llm.warmup_seconds:.1f} s)\n")

    params = SamplingParams(max_tokens=96, temperature=0.0)
    start = time.perf_counter()
    outputs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
    seconds = time.perf_counter() - start
    for question, out in zip(QUESTIONS, outputs):
        print(f"Q: {question}\nA: {out.text.strip()}\n")
    generated = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} chats, {generated} tokens generated in {seconds:.1f} s "
          f"({generated / seconds:.1f} tokens/s)\n")

    print("streaming: ", end="", flush=True)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a short story about a robot."}])
    for delta in llm.stream(prompt, SamplingParams(max_tokens=80, temperature=0.7, top_p=0.9, seed=0)):
        print(delta, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
