"""A small Spanish chat dataset, generated deterministically (smol-course instruction-tuning spirit)."""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEMS = [
    "Eres un asistente útil que responde en español de forma breve y clara.",
    "Eres un profesor paciente. Explica con ejemplos sencillos.",
    "Responde siempre en español, con frases cortas.",
]
CAPITALS = {
    "España": "Madrid", "Francia": "París", "Italia": "Roma", "Portugal": "Lisboa", "Alemania": "Berlín",
    "México": "Ciudad de México", "Argentina": "Buenos Aires", "Chile": "Santiago", "Perú": "Lima",
    "Colombia": "Bogotá", "Japón": "Tokio", "Egipto": "El Cairo", "Canadá": "Ottawa", "Cuba": "La Habana",
}
COLORS = {"cielo": "azul", "césped": "verde", "sol": "amarillo", "nieve": "blanca", "carbón": "negro",
          "tomate": "rojo", "naranja": "naranja", "uva": "morada"}
WORDS = {"hello": "hola", "thank you": "gracias", "cat": "gato", "dog": "perro", "house": "casa",
         "water": "agua", "book": "libro", "friend": "amigo", "school": "escuela", "bread": "pan"}


def chat_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        country, capital = rng.choice(sorted(CAPITALS.items()))
        return f"¿Cuál es la capital de {country}?", f"La capital de {country} es {capital}."
    if kind == 1:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"¿Cuánto es {a} más {b}?", f"{a} más {b} es {a + b}."
    if kind == 2:
        thing, color = rng.choice(sorted(COLORS.items()))
        return f"¿De qué color es el {thing}?", f"El {thing} es normalmente {color}."
    en, es = rng.choice(sorted(WORDS.items()))
    return f"¿Cómo se dice '{en}' en español?", f"'{en}' en español se dice '{es}'."


def conversations(n: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.7:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _ in range(rng.randint(1, 3)):
            q, a = chat_turn(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, n: int = 200, seed: int = 0) -> Path:
    return write_rows(path, conversations(n, seed))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path
