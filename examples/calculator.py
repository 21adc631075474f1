"""SmolLM2-135M-Instruct with a calculator tool, GSM8K-calculator style.

A few-shot prompt teaches the model to write `<<expression>>`; the engine pauses the request
there, `LLM.generate` runs the calculator on a worker thread while the other questions keep
generating, and `=result` is appended for the model to read on.
"""
import ast
import operator
import time

from infercept_jax import LLM, SamplingParams, Tool, ToolFormat

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}

SHOTS = [("Anna has 4 bags with 6 apples in each bag. How many apples does she have?", "4*6"),
         ("What is 128 minus 45?", "128-45"),
         ("A pen costs 3 dollars. How much do 7 pens cost?", "7*3"),
         ("What is 96 divided by 8?", "96/8"),
         ("Mia read 35 pages on Monday and 48 pages on Tuesday. How many pages did she read?", "35+48"),
         ("What is 19 times 21?", "19*21")]

QUESTIONS = ["What is 37 times 24?",
             "A box holds 12 eggs. How many eggs are in 15 boxes?",
             "Sara had 250 dollars and spent 87 dollars. How much money does she have left?",
             "A train travels 65 miles per hour for 4 hours. How far does it go?",
             "What is 1024 divided by 16?",
             "Tom buys 3 books at 14 dollars each and a pen for 2 dollars. How much does he spend?"]


def evaluate(node: ast.AST) -> float:
    """Numbers and + - * / // % only: the model's text is never handed to eval()."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.operand))
    raise ValueError(f"not arithmetic: {ast.unparse(node)}")


def calculate(expression: str) -> str:
    value = evaluate(ast.parse(expression.replace(",", ""), mode="eval").body)
    return f"{value:.6g}" if isinstance(value, float) and not value.is_integer() else str(int(value))


def answer(expression: str) -> str:
    value = calculate(expression)
    return f"<<{expression}>>={value}. The answer is {value}."


def main() -> None:
    # Calls take microseconds, so a paused request keeps its KV where it is.
    llm = LLM("smollm2-135m", max_model_len=1024, kv_cache_memory_gb=0.25, policy="preserve")
    prompt = "".join(f"Q: {q}\nA: {answer(e)}\n\n" for q, e in SHOTS)
    calls = ToolFormat(call_start="<<", call_end=">>", result_template="={result}")
    params = SamplingParams(max_tokens=60, temperature=0.0, stop=["\n"], tool_format=calls, max_interceptions=4)
    start = time.perf_counter()
    outputs = llm.generate([f"{prompt}Q: {q}\nA:" for q in QUESTIONS], params, tools=[Tool("calc", calculate)])
    seconds = time.perf_counter() - start
    for question, out in zip(QUESTIONS, outputs):
        print(f"Q: {question}\nA:{out.text}")
        for call in out.tool_calls:
            print(f"   calc({call.arguments}) -> {call.result}{' (error)' if call.error else ''}")
        print()
    answered = sum(bool(out.tool_calls) for out in outputs)
    print(f"{sum(len(out.tool_calls) for out in outputs)} calls in {answered} of {len(QUESTIONS)} answers "
          f"({seconds:.1f} s)")
    llm.close()


if __name__ == "__main__":
    main()
