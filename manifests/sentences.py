"""Voice-assistant-style sentences for the synthetic demo corpus: templates with slots, filler lists, and
a fixed partition of the (template, fillers) space into train / dev / test regions.

Besides questions, requests and statements, a "short" kind covers what people also say to an assistant and what
real corpora hold (Speech Commands' words, spoken digits, codes and phone numbers): a single word, a digit, and
strings of two to four digits, about 14% of the train utterances (9% single words and digits: in train a text of
these recurs in up to 3 and 9 voice-and-speed pairs, the way Common Voice's single-word segment has every digit
read by many speakers). Without them a student trained on full sentences answers a spoken "seven" the way it
answers a request.

Every combination of a template and a filler tuple lands in exactly one region, decided by a hash of the
combination (not by the seed or the sizes), so held-out sentences never share a template-and-filler
combination with train, and a test sentence stays in test whatever the corpus size. The seed only picks
which combinations of each region are drawn. No text is in two splits, and held-out texts are all distinct.
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

Kind = Literal["question", "request", "statement", "short"]
SPLITS = ("train", "dev", "test")
# Share of the combination space held out for dev and for test (the rest is train's region).
HELD_OUT_FRACTION = {"dev": 0.1, "test": 0.1}


def _words(text: str) -> tuple[str, ...]:
    """A filler list written as one comma-separated string."""
    return tuple(word.strip() for word in text.split(","))


# Filler lists, one per slot type. Words are written the way Whisper's English normaliser and the
# voices agree on (no clock times like 7:30, no abbreviations that are read letter by letter).
FILLERS: dict[str, tuple[str, ...]] = {
    "city": _words(
        "Paris, London, Tokyo, Chicago, Boston, Seattle, Denver, Madrid, Rome, Berlin, Dublin, Sydney, Toronto, "
        "Vancouver, Miami, Atlanta, Austin, Phoenix, Dallas, Houston, Cairo, Lisbon, Vienna, Prague, Amsterdam, "
        "Stockholm, Athens, Singapore, Bangkok, Nairobi, Mexico City, San Francisco, Los Angeles, New York, "
        "Melbourne, Edinburgh, Montreal, Barcelona, Copenhagen, Honolulu"
    ),
    "country": _words(
        "France, Japan, Brazil, Canada, Italy, Germany, Spain, Mexico, India, Kenya, Egypt, Norway, Peru, Greece, "
        "Portugal, Australia, Ireland, Vietnam, Thailand, Argentina, Iceland, Morocco, Chile, Sweden, Turkey"
    ),
    "dish": _words(
        "lasagna, pancakes, chicken curry, banana bread, vegetable soup, fried rice, chocolate cake, apple pie, "
        "beef stew, tomato sauce, guacamole, pizza dough, lemon chicken, mushroom risotto, potato salad, "
        "garlic bread, shrimp tacos, oatmeal cookies, pumpkin soup, meatballs, French toast, scrambled eggs, "
        "chili, carrot cake, lentil soup, grilled salmon, mashed potatoes, blueberry muffins"
    ),
    "ingredient": _words(
        "eggs, butter, flour, sugar, rice, garlic, onions, tomatoes, spinach, cheese, milk, honey, olive oil, "
        "carrots, lemons, chicken, salmon, potatoes, yogurt, bread, peanuts, mushrooms, coconut milk, almonds, "
        "broccoli"
    ),
    "item": _words(
        "milk, batteries, paper towels, coffee, dish soap, toothpaste, bananas, dog food, light bulbs, "
        "orange juice, trash bags, cereal, shampoo, peanut butter, sparkling water, apples, laundry detergent, "
        "cat food, green tea, strawberries"
    ),
    "time": _words(
        "six in the morning, seven in the morning, eight in the morning, nine in the morning, noon, midnight, "
        "one in the afternoon, three in the afternoon, five in the afternoon, six in the evening, "
        "seven in the evening, eight at night, half past seven, half past six, quarter past eight, "
        "quarter to nine, ten at night, eleven in the morning"
    ),
    "day": _words(
        "today, tomorrow, tonight, this weekend, on Monday, on Tuesday, on Wednesday, on Thursday, on Friday, "
        "on Saturday, on Sunday, next week, this afternoon, tomorrow morning, tomorrow evening, this evening"
    ),
    "duration": _words(
        "five minutes, ten minutes, twenty minutes, half an hour, an hour, two hours, three minutes, "
        "fifteen minutes, forty minutes, ninety seconds, twelve minutes, twenty five minutes, eight minutes, "
        "thirty seconds"
    ),
    # digits: the voices read them out, and the normaliser turns spoken numbers into digits
    "number": _words("3, 4, 6, 7, 8, 9, 11, 12, 14, 15, 16, 18, 21, 24, 25, 32, 40, 48, 50, 64, 75, 99, 100, 120"),
    "quantity": _words("two, three, four, five, six, eight"),
    "percent": _words("ten, twenty, thirty, forty, fifty, sixty, seventy, eighty"),
    "temperature": _words("sixty five, sixty eight, seventy, seventy two, sixty, seventy five"),
    "person": _words(
        "Sarah, David, Emma, Michael, Olivia, James, Sophia, Daniel, Grace, Thomas, Lucy, Peter, Anna, Robert, "
        "Maria, Kevin, Laura, Rachel, Ben, Jessica, Henry, Julia, Oscar, Nina"
    ),
    "relative": _words(
        "mom, dad, sister, brother, boss, neighbor, grandmother, grandfather, best friend, roommate, teacher, "
        "uncle, aunt, cousin, wife, husband, son, daughter"
    ),
    "device": _words(
        "lights, heater, fan, TV, air conditioner, coffee maker, dishwasher, porch light, speakers, "
        "washing machine, radio, lamp"
    ),
    "room": _words(
        "kitchen, living room, bedroom, bathroom, garage, office, hallway, basement, dining room, guest room, "
        "attic, nursery"
    ),
    "topic": _words(
        "black holes, photosynthesis, the Roman Empire, climate change, volcanoes, the human heart, electricity, "
        "the moon landing, earthquakes, rainbows, vaccines, the French Revolution, honeybees, the stock market, "
        "gravity, dinosaurs, the internet, ocean tides, the immune system, jet engines, solar panels, "
        "the pyramids, coral reefs, inflation"
    ),
    "language": _words(
        "French, Spanish, German, Italian, Japanese, Chinese, Portuguese, Korean, Russian, Dutch, Greek, Swedish"
    ),
    "phrase": _words(
        "good morning, thank you very much, where is the train station, how much does this cost, "
        "I would like a coffee, nice to meet you, see you tomorrow, happy birthday, I am lost, "
        "can I have the bill, where is the bathroom, I don't understand"
    ),
    "genre": _words(
        "jazz, classical music, rock music, country music, hip hop, reggae, blues, pop music, folk music, "
        "piano music, relaxing music, dance music"
    ),
    "animal": _words(
        "dolphins, elephants, owls, penguins, octopuses, tigers, bees, wolves, giraffes, sharks, cats, horses, "
        "parrots, turtles, foxes, whales, crows, bears"
    ),
    "activity": _words(
        "go hiking, learn to cook, start running, read more books, sleep better, save money, learn the guitar, "
        "start painting, meditate, study for my exams, plant a garden, train my puppy, eat healthier, "
        "learn to swim, wake up earlier, drink more water"
    ),
    "event": _words(
        "meeting, dentist appointment, dinner reservation, yoga class, phone call, team lunch, haircut, "
        "doctor appointment, birthday party, piano lesson, job interview, soccer practice"
    ),
    "sport": _words(
        "soccer, basketball, tennis, baseball, golf, hockey, cricket, volleyball, rugby, football, swimming, cycling"
    ),
    "color": _words("red, blue, green, yellow, purple, orange, pink, warm white"),
    "movie": _words(
        "comedy, thriller, documentary, horror movie, romantic comedy, mystery, cartoon, science fiction movie, "
        "war movie, family movie, musical, detective story"
    ),
    "place": _words(
        "coffee shop, pharmacy, gas station, grocery store, library, park, bakery, bookstore, gym, post office, "
        "pizza place, hardware store, bank, train station"
    ),
    "feeling": _words("tired, stressed, bored, excited, hungry, nervous, happy, sleepy, relaxed"),
    "news": _words(
        "technology, science, sports, health, business, space exploration, music, the economy, electric cars, "
        "the weather"
    ),
    "subject": _words(
        "the ocean, autumn leaves, a rainy day, my cat, the city at night, friendship, coffee, the mountains, "
        "the first snow, a long train ride, summer mornings, an old dog"
    ),
    # single words said on their own (commands, answers, the Speech Commands vocabulary's kind of word)
    "word": _words(
        "yes, no, stop, go, up, down, left, right, on, off, cancel, next, back, pause, play, help, repeat, louder, "
        "quieter, hello, goodbye, thanks, wait, continue, skip, again, sorry, maybe, forward, backward, follow, "
        "faster, slower, open, close, start, finish, ready, done, please, bird, cat, dog, house, tree, happy, music, "
        "weather, lights, coffee, news, morning, tonight, tomorrow"
    ),
    # spoken one at a time, as words (a digit string is read digit by digit)
    "digit": _words("zero, one, two, three, four, five, six, seven, eight, nine"),
    # days without a part of the day, for sentences that already name a time
    "date": _words(
        "today, tomorrow, on Monday, on Tuesday, on Wednesday, on Thursday, on Friday, on Saturday, on Sunday, "
        "next Monday, next Friday, the day after tomorrow"
    ),
}

# (id, kind, text). Slots are {type} or {type2} (a second, different filler of the same type).
TEMPLATES: tuple[tuple[str, Kind, str], ...] = (
    # questions
    ("weather.city_day", "question", "What's the weather like in {city} {day}?"),
    ("weather.rain", "question", "Will it rain in {city} {day}?"),
    ("weather.sunny", "question", "Is it going to be sunny in {city} {day}?"),
    ("weather.wear", "question", "What should I wear in {city} {day}?"),
    ("weather.umbrella", "question", "Do I need an umbrella {day}?"),
    ("travel.time_in", "question", "What time is it in {city} right now?"),
    ("travel.distance", "question", "How far is {city} from {city2}?"),
    ("travel.flight_length", "question", "How long is the flight from {city} to {city2}?"),
    ("travel.visit_when", "question", "What's the best time of year to visit {country}?"),
    ("facts.capital", "question", "What's the capital of {country}?"),
    ("facts.language", "question", "What language do people speak in {country}?"),
    ("facts.animal_live", "question", "Where do {animal} live?"),
    ("facts.animal_eat", "question", "What do {animal} eat?"),
    ("facts.animal_age", "question", "How long do {animal} usually live?"),
    ("facts.animal_compare", "question", "What's the difference between {animal} and {animal2}?"),
    ("facts.explain", "question", "Can you explain {topic} in simple terms?"),
    ("facts.why_matter", "question", "Why is {topic} so important?"),
    ("cooking.how", "question", "How do I make {dish}?"),
    ("cooking.need", "question", "What do I need to make {dish} for {quantity} people?"),
    ("cooking.swap", "question", "Can I use {ingredient} instead of {ingredient2}?"),
    ("cooking.with", "question", "What can I cook with {ingredient} and {ingredient2}?"),
    ("cooking.calories", "question", "How many calories are in {ingredient}?"),
    ("math.times", "question", "What is {number} times {number2}?"),
    ("math.plus", "question", "What's {number} plus {number2}?"),
    ("math.miles", "question", "How many kilometers are in {number} miles?"),
    ("math.ounces", "question", "How many grams are in {number} ounces?"),
    ("language.say", "question", "How do you say {phrase} in {language}?"),
    ("language.hard", "question", "Is {language} harder to learn than {language2}?"),
    ("calendar.next", "question", "When is my next {event}?"),
    ("calendar.free", "question", "Is {person} free {day}?"),
    ("calendar.birthday", "question", "When is my {relative}'s birthday?"),
    ("local.near", "question", "Is there a {place} near me?"),
    ("local.close", "question", "What time does the {place} close {day}?"),
    ("advice.how", "question", "What's a good way to {activity}?"),
    ("advice.tips", "question", "Can you give me some tips to {activity}?"),
    ("media.watch", "question", "What's a good {movie} to watch {day}?"),
    ("sports.score", "question", "Who won the {sport} game last night?"),
    ("sports.rules", "question", "How do you keep score in {sport}?"),
    ("home.left_on", "question", "Did I leave the {device} on in the {room}?"),
    # requests
    ("timer.set", "request", "Set a timer for {duration}."),
    ("timer.named", "request", "Set a timer for {duration} for the {dish}."),
    ("alarm.set", "request", "Set an alarm for {time} {date}."),
    ("alarm.wake", "request", "Wake me up at {time} {date}."),
    ("remind.call", "request", "Remind me to call my {relative} {day}."),
    ("remind.buy", "request", "Remind me to buy {item} {day}."),
    ("remind.event", "request", "Remind me about the {event} at {time}."),
    ("list.add", "request", "Add {item} to my shopping list."),
    ("list.add_two", "request", "Add {item} and {item2} to my shopping list."),
    ("music.play", "request", "Play some {genre}."),
    ("music.play_room", "request", "Play some {genre} in the {room}."),
    ("home.on", "request", "Turn on the {device} in the {room}."),
    ("home.off", "request", "Turn off the {device} in the {room}."),
    ("home.dim", "request", "Dim the lights in the {room} to {percent} percent."),
    ("home.thermostat", "request", "Set the thermostat in the {room} to {temperature} degrees."),
    ("home.color", "request", "Change the lights in the {room} to {color}."),
    ("message.late", "request", "Send a message to {person} saying I'll be late."),
    ("message.way", "request", "Text my {relative} that I'm on my way."),
    ("message.call", "request", "Call {person} on speaker."),
    ("calendar.schedule", "request", "Schedule a {event} with {person} {day}."),
    ("calendar.cancel", "request", "Cancel my {event} {day}."),
    ("cooking.recipe", "request", "Find me a recipe for {dish}."),
    ("cooking.serves", "request", "Give me a recipe for {dish} that serves {quantity}."),
    ("language.translate", "request", "Translate {phrase} into {language}."),
    ("facts.fun", "request", "Tell me a fun fact about {animal}."),
    ("facts.more", "request", "Tell me something interesting about {topic}."),
    ("local.directions", "request", "Give me directions to the nearest {place}."),
    ("local.table", "request", "Book a table for {quantity} at {time} {date}."),
    ("news.read", "request", "Read me the latest news about {news}."),
    ("writing.poem", "request", "Write a short poem about {subject}."),
    ("travel.plan", "request", "Help me plan a trip to {city}."),
    ("travel.flights", "request", "Find cheap flights to {city} {day}."),
    ("shopping.order", "request", "Order more {item}."),
    # short: a word, a digit, digit strings
    ("short.word", "short", "{word}."),
    ("short.digit", "short", "{digit}."),
    ("short.digits2", "short", "{digit} {digit2}."),
    ("short.digits3", "short", "{digit} {digit2} {digit3}."),
    ("short.digits4", "short", "{digit} {digit2} {digit3} {digit4}."),
    # statements
    ("travel.back", "statement", "I just got back from {city} and the food was amazing."),
    ("travel.flight", "statement", "My flight to {city} leaves {day}."),
    ("travel.move", "statement", "We're thinking about moving to {city}."),
    ("travel.dream", "statement", "I've always wanted to visit {country}."),
    ("social.dinner", "statement", "{person} is coming over for dinner {day}."),
    ("social.birthday", "statement", "My {relative}'s birthday is {day}."),
    ("social.moved", "statement", "{person} said the {event} is now {date}."),
    ("cooking.tonight", "statement", "I'm making {dish} for dinner {day}."),
    ("cooking.allergy", "statement", "I'm allergic to {ingredient}."),
    ("cooking.out", "statement", "I think we're out of {item}."),
    ("mood.feeling", "statement", "I'm feeling really {feeling} today."),
    ("learning.topic", "statement", "I want to learn more about {topic}."),
    ("learning.trying", "statement", "I've been trying to {activity} but it's hard."),
    ("home.left", "statement", "I left the {device} on in the {room}."),
    ("home.cold", "statement", "It's way too cold in the {room}."),
    ("music.love", "statement", "I really love listening to {genre}."),
    ("calendar.have", "statement", "I have a {event} at {time} {date}."),
    ("sports.favorite", "statement", "My favorite sport to watch is {sport}."),
    ("media.watched", "statement", "We watched a {movie} last night and it was great."),
    ("language.learning", "statement", "I'm learning {language} for my trip to {country}."),
)


# Draw weight multipliers: a single word or digit is a tiny template space (54 and 10 texts, each drawn once at
# most), so without a boost a corpus of 2,000 holds only a dozen of them.
BOOST = {"short.word": 12.0, "short.digit": 15.0}
# How often a train text of these templates may recur, each time in another voice or at another speed (a
# sentence of Common Voice is read by many speakers; a 2,000-row corpus otherwise holds ~50 single words).
# Held-out splits keep every text once.
REPEATS = {"short.word": 3, "short.digit": 9}


@dataclass(frozen=True)
class Template:
    """A sentence pattern; `slots` are its placeholders in order, `types` the filler list of each."""

    id: str
    kind: Kind
    text: str

    @cached_property
    def slots(self) -> tuple[str, ...]:
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.text) if name)

    @cached_property
    def types(self) -> tuple[str, ...]:
        return tuple(slot.rstrip("0123456789") for slot in self.slots)

    @cached_property
    def space(self) -> int:
        """How many filler tuples the template admits (slots of one type take distinct fillers)."""
        size = 1
        used: dict[str, int] = {}
        for kind in self.types:
            size *= len(FILLERS[kind]) - used.get(kind, 0)
            used[kind] = used.get(kind, 0) + 1
        return size

    def render(self, fillers: tuple[str, ...]) -> str:
        return self.text.format(**dict(zip(self.slots, fillers, strict=True)))


@dataclass(frozen=True)
class Sentence:
    """One drawn sentence and the combination it came from."""

    text: str
    template: str
    kind: Kind
    fillers: tuple[str, ...]

    @property
    def combination(self) -> tuple[str, tuple[str, ...]]:
        return self.template, self.fillers


def templates() -> tuple[Template, ...]:
    return tuple(Template(*row) for row in TEMPLATES)


def region(template_id: str, fillers: tuple[str, ...]) -> str:
    """The split whose region holds this combination: a hash, independent of the seed and the sizes."""
    key = "\x1f".join((template_id, *fillers)).encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    if u < HELD_OUT_FRACTION["dev"]:
        return "dev"
    if u < HELD_OUT_FRACTION["dev"] + HELD_OUT_FRACTION["test"]:
        return "test"
    return "train"


def _draw_fillers(template: Template, rng: random.Random) -> tuple[str, ...] | None:
    """Uniform fillers for the template's slots; None when two slots of one type drew the same filler."""
    fillers = tuple(rng.choice(FILLERS[kind]) for kind in template.types)
    pairs = set(zip(template.types, fillers, strict=True))
    return fillers if len(pairs) == len(fillers) else None


def _candidates(split: str, seed: int) -> Iterator[Sentence]:
    """An endless stream of combinations of `split`'s region, drawn with a per-split generator.

    Templates are weighted by the square root of their space, so large templates give more sentences
    without drowning the small ones, times BOOST (single words and digits: their few texts are all drawn).
    """
    rng = random.Random(f"diva-synth:{seed}:{split}")
    pool = templates()
    weights = [math.sqrt(t.space) * BOOST.get(t.id, 1.0) for t in pool]
    while True:
        template = rng.choices(pool, weights)[0]
        fillers = _draw_fillers(template, rng)
        if fillers is not None and region(template.id, fillers) == split:
            yield Sentence(template.render(fillers), template.id, template.kind, fillers)


def draw_sentences(sizes: dict[str, int], seed: int, max_repeats: int = 1) -> dict[str, list[Sentence]]:
    """`sizes[split]` sentences for each split, no text in two splits. Deterministic for a given seed; held-out
    splits are drawn first, so they do not change with the train size. Held-out texts are distinct; a train
    text of a REPEATS template recurs up to min(REPEATS, max_repeats) times (the caller gives each recurrence
    another voice or speed), every other text once."""
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {', '.join(SPLITS)}")
    taken: set[str] = set()
    drawn: dict[str, list[Sentence]] = {}
    for split in ("test", "dev", "train"):
        count = sizes.get(split, 0)
        repeats = {t: min(n, max_repeats) for t, n in REPEATS.items()} if split == "train" else {}
        drawn[split] = _draw_split(split, count, seed, taken, repeats)
    return {split: drawn[split] for split in SPLITS if split in sizes}


def _draw_split(split: str, count: int, seed: int, taken: set[str], repeats: dict[str, int]) -> list[Sentence]:
    """`count` sentences of `split`'s region whose texts are not in `taken` (which it extends); a text of a
    template in `repeats` may be drawn that many times."""
    out: list[Sentence] = []
    drawn: Counter[str] = Counter()
    budget = 1000 * count + 10_000  # draws before giving up: the region is too small for `count`
    candidates = _candidates(split, seed)
    tries = 0
    while len(out) < count:
        sentence = next(candidates)
        tries += 1
        if tries > budget:
            raise ValueError(
                f"could draw only {len(out)} distinct {split} sentences of {count}; the template space is "
                "too small for this size (lower the split sizes or add templates/fillers)"
            )
        if sentence.text not in taken or 0 < drawn[sentence.text] < repeats.get(sentence.template, 1):
            taken.add(sentence.text)
            drawn[sentence.text] += 1
            out.append(sentence)
    return out
