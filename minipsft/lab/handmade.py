"""Tasks written for the project, so that a real model is fine-tuned and scored with no download:
arithmetic word problems made from templates (in domain, answered in GSM8K's style, ``#### N``),
a multiple-choice knowledge set and an instruction-following set with exact checks (out of
domain: what an instruct model already does). Every generator is deterministic for its seed."""
import random

__all__ = ["word_problems", "KNOWLEDGE", "knowledge_items", "instruction_rows",
           "follows_instruction"]

NAMES = ("Tom", "Ann", "Maya", "Leo", "Sara", "Omar", "Lina", "Ben", "Nora", "Sam", "Eva", "Raj")
THINGS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells",
          "cookies", "stamps")


def _problem(rng: random.Random) -> tuple:
    """(question, worked solution, answer) of one two-step problem."""
    name, other = rng.sample(NAMES, 2)
    thing, kind = rng.choice(THINGS), rng.randrange(4)
    a, b = rng.randint(3, 30), rng.randint(2, 20)
    if kind == 0:  # a + b - c
        c = rng.randint(1, a + b - 1)
        q = (f"{name} has {a} {thing}. {name} buys {b} more and then gives {c} to {other}. "
             f"How many {thing} does {name} have now?")
        s = (f"{name} has {a} + {b} = {a + b} {thing} after buying. After giving {c} away, "
             f"{name} has {a + b} - {c} = {a + b - c} {thing}.")
        return q, s, a + b - c
    if kind == 1:  # a * b + c
        a, c = rng.randint(2, 9), rng.randint(1, 20)
        q = (f"{name} has {a} boxes with {b} {thing} in each box, and {c} loose {thing}. "
             f"How many {thing} does {name} have in all?")
        s = (f"The boxes hold {a} * {b} = {a * b} {thing}. With the loose ones, "
             f"{name} has {a * b} + {c} = {a * b + c} {thing}.")
        return q, s, a * b + c
    if kind == 2:  # (a + b) * 2
        q = (f"{name} has {a} {thing} and {other} has {b} {thing}. {name} then doubles the "
             f"number of {thing} they have together. How many {thing} is that?")
        s = (f"Together they have {a} + {b} = {a + b} {thing}. Doubled, that is "
             f"{a + b} * 2 = {(a + b) * 2} {thing}.")
        return q, s, (a + b) * 2
    k = rng.randint(2, 6)  # a * k shared among k, plus b
    q = (f"{name} shares {a * k} {thing} equally among {k} friends. {other} is one of them and "
         f"already had {b} {thing}. How many {thing} does {other} have now?")
    s = (f"Each friend gets {a * k} / {k} = {a} {thing}. {other} now has {a} + {b} = {a + b} "
         f"{thing}.")
    return q, s, a + b


def word_problems(n: int, seed: int, instruction: str) -> list:
    """``n`` conversational rows (question + ``instruction``, worked solution ending ``#### N``),
    each with its answer as ``final``."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        q, solution, answer = _problem(rng)
        rows.append({"messages": [{"role": "user", "content": f"{q}\n{instruction}"},
                                  {"role": "assistant", "content": f"{solution}\n#### {answer}"}],
                     "final": str(answer)})
    return rows


# question, right answer, three wrong ones: what a small instruct model already knows
KNOWLEDGE = (
    ("What is the capital of France?", "Paris", "Berlin", "Madrid", "Rome"),
    ("What is the capital of Japan?", "Tokyo", "Beijing", "Seoul", "Bangkok"),
    ("What is the capital of Italy?", "Rome", "Paris", "Vienna", "Athens"),
    ("What is the capital of Germany?", "Berlin", "Munich", "Vienna", "Zurich"),
    ("What is the capital of Spain?", "Madrid", "Lisbon", "Barcelona", "Paris"),
    ("What is the capital of the United Kingdom?", "London", "Dublin", "Edinburgh", "Paris"),
    ("What is the capital of Egypt?", "Cairo", "Nairobi", "Lagos", "Tunis"),
    ("What is the capital of Canada?", "Ottawa", "Toronto", "Vancouver", "Chicago"),
    ("How many days are in a week?", "Seven", "Five", "Ten", "Twelve"),
    ("How many legs does a spider have?", "Eight", "Six", "Four", "Ten"),
    ("How many months are in a year?", "Twelve", "Ten", "Seven", "Fifteen"),
    ("How many continents are there on Earth?", "Seven", "Three", "Twelve", "Twenty"),
    ("What color is the sky on a clear day?", "Blue", "Green", "Red", "Purple"),
    ("What color are ripe bananas?", "Yellow", "Blue", "Purple", "Black"),
    ("What do bees make?", "Honey", "Milk", "Silk", "Wool"),
    ("Which animal is known as the king of the jungle?", "The lion", "The mouse", "The cow",
     "The sheep"),
    ("What is the largest planet in our solar system?", "Jupiter", "Mars", "Mercury", "Venus"),
    ("Which planet is known as the Red Planet?", "Mars", "Venus", "Saturn", "Neptune"),
    ("What is the closest star to the Earth?", "The Sun", "Sirius", "Polaris", "Vega"),
    ("What gas do plants take in from the air?", "Carbon dioxide", "Helium", "Neon", "Argon"),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees",
     "50 degrees", "10 degrees", "500 degrees"),
    ("What is frozen water called?", "Ice", "Steam", "Sand", "Glass"),
    ("Which organ pumps blood through the body?", "The heart", "The liver", "The lungs",
     "The stomach"),
    ("What do we use our eyes for?", "To see", "To hear", "To smell", "To taste"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Charles Dickens", "Mark Twain",
     "Jane Austen"),
    ("Which ocean is the largest?", "The Pacific Ocean", "The Indian Ocean",
     "The Arctic Ocean", "The Atlantic Ocean"),
    ("What is the chemical symbol for water?", "H2O", "CO2", "NaCl", "O3"),
    ("How many sides does a triangle have?", "Three", "Four", "Five", "Six"),
    ("What is the opposite of hot?", "Cold", "Warm", "Loud", "Tall"),
    ("Which season comes after winter?", "Spring", "Summer", "Autumn", "Winter"),
    ("What language is mainly spoken in Brazil?", "Portuguese", "Spanish", "French",
     "German"),
    ("What is the main language of the United States?", "English", "Russian", "Chinese",
     "Italian"),
    ("Which animal says 'moo'?", "The cow", "The cat", "The dog", "The duck"),
    ("What do caterpillars turn into?", "Butterflies", "Spiders", "Birds", "Fish"),
    ("What is the tallest animal in the world?", "The giraffe", "The elephant", "The horse",
     "The rabbit"),
    ("Which metal is liquid at room temperature?", "Mercury", "Iron", "Gold", "Copper"),
    ("What do you call a baby dog?", "A puppy", "A kitten", "A calf", "A foal"),
    ("Which instrument has black and white keys?", "The piano", "The drum", "The flute",
     "The violin"),
    ("What is the currency of Japan?", "The yen", "The euro", "The dollar", "The peso"),
    ("Where do penguins mostly live?", "Antarctica", "The Sahara", "Europe", "The Amazon"),
)


def knowledge_items() -> list:
    """``KNOWLEDGE`` as multiple-choice items in the harness's prompt format (``Question: ...
    Answer:`` as the user turn); the right answer's place is fixed by a seeded shuffle."""
    rng, items = random.Random(0), []
    for question, *choices in KNOWLEDGE:
        order = rng.sample(range(4), 4)
        items.append({"prompt": [{"role": "user", "content": f"Question: {question}\nAnswer:"}],
                      "choices": [choices[i] for i in order], "label": order.index(0)})
    return items


# instruction template, check kind; {w} is filled with a word, {t} with a topic. Kept: those
# SmolLM2-135M-Instruct follows often enough to measure a loss (its base score is in the report)
INSTRUCTIONS = (
    ("Write one sentence that uses the word '{w}'.", "uses_word"),
    ("List three facts about {t}, one per line.", "three_lines"),
    ("Write two short sentences about {t}, each on its own line.", "two_lines"),
    ("Write one short sentence about {t} without using any commas.", "no_comma"),
    ("Describe {t} in fewer than 20 words.", "short"),
    ("Repeat this sentence exactly: 'The {w} is on the table.'", "repeat"),
    ("Ask me one question about {t}.", "question"),
    ("Is {t} interesting? Answer with yes or no.", "yes_no"),
)
WORDS = ("apple", "river", "garden", "music", "window", "yellow", "planet", "summer")
TOPICS = ("dogs", "the ocean", "music", "trees", "the moon", "bread", "rain", "books")


def instruction_rows() -> list:
    """Every instruction with two (word, topic) fills: prompts with what ``follows_instruction``
    checks (``kind``, ``word``)."""
    rows = []
    for k, (template, kind) in enumerate(INSTRUCTIONS):
        for j in range(2):
            word, topic = WORDS[(k + 3 * j) % len(WORDS)], TOPICS[(2 * k + j) % len(TOPICS)]
            rows.append({"prompt": [{"role": "user",
                                     "content": template.format(w=word, t=topic)}],
                         "kind": kind, "word": word})
    return rows


def follows_instruction(row: dict, text: str) -> bool:
    """The exact check of one instruction on a generation (whitespace at the ends ignored)."""
    text, word, kind = text.strip(), row["word"], row["kind"]
    lines = [line for line in text.splitlines() if line.strip()]
    checks = {
        "uses_word": lambda: word in text.lower(),
        "three_lines": lambda: len(lines) >= 3,
        "two_lines": lambda: len(lines) == 2,
        "no_comma": lambda: bool(text) and "," not in text,
        "short": lambda: 0 < len(text.split()) < 20,
        "repeat": lambda: f"the {word} is on the table" in text.lower(),
        "question": lambda: "?" in text,
        "yes_no": lambda: text.lower().startswith(("yes", "no")),
    }
    return checks[kind]()
