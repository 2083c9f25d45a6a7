#!/usr/bin/env python3
"""Generate the small text corpus bundled for the README demo of semdedup.

The corpus imitates what SemDeDup finds in C4: many unrelated short web pages
("originals"), plus planted semantic duplicates of some of them:

* ``templated``  - the same template page with only one number, street or person's name
                   swapped (the paper's template spam: pages stamped out of one template);
* ``paraphrase`` - the same content reworded: sentences reordered, synonyms swapped,
                   one sentence dropped or added;
* ``exact``      - a byte-identical copy, or the same text with only case/whitespace changed.

Every document has ``id``, ``text``, ``kind`` and ``source`` (the id of the original a
derived document was made from, null for originals), so the demo can score what
SemDeDup removes against what was planted.

City, brand and title swaps are deliberately not planted: in pages this short,
all-MiniLM-L6-v2 weighs such a name heavily (one swapped city moves the cosine to ~0.8),
so they would not be near-duplicates under any sensible eps.

Pure standard library and a fixed seed: running it twice gives byte-identical files.

    python scripts/make_demo_corpus.py [--out semdedup_core/demo_data]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20230316
N_TEMPLATED = 400
N_PARAPHRASE = 300
N_EXACT = 100  # half byte-identical, half case/whitespace variants
N_SHARDS = 3
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "semdedup_core" / "demo_data"

# ---------------------------------------------------------------------------------------
# Shared word lists. Cities, names and numbers vary from page to page; numbers, streets and
# people's names are also what templated copies swap, as the encoder barely notices them.
# ---------------------------------------------------------------------------------------

FIRST = """Ada Alan Amara Ana Arjun Bea Ben Carla Chen Dana Dev Eli Elena Emma Farah Felix Gia
Grace Hana Hugo Ines Ivan Jade Jonas Kai Kenji Lara Leo Lina Luca Maya Mateo Mia Nadia Noah
Nora Omar Owen Paula Priya Quinn Rafael Rosa Ruth Sam Sara Simon Sofia Tara Theo Uma Vera
Victor Wren Yara Yusuf Zoe""".split()

LAST = """Abbott Adeyemi Alvarez Banks Becker Bishop Brennan Castillo Chandler Cho Costa Dalton
Diaz Doyle Ellis Engel Farrell Fischer Flores Garner Hale Hartman Ibarra Jensen Kaur Keller
Kowalski Lambert Larsen Lopez Mahoney Marsh Moreno Murphy Nakamura Nolan Novak Okafor Olsen
Ortiz Patel Petrov Quinlan Reyes Rossi Sato Schmidt Serrano Silva Sullivan Tanaka Torres
Varga Walsh Weber Whitfield Yilmaz Young Zimmer""".split()

CITIES = """Albany|Amarillo|Anchorage|Ann Arbor|Asheville|Augusta|Austin|Bangor|Billings|Bismarck|
Boise|Boulder|Buffalo|Burlington|Calgary|Charleston|Chattanooga|Cheyenne|Concord|Dayton|Denver|
Des Moines|Dubuque|Duluth|Durham|Erie|Eugene|Fargo|Flagstaff|Fort Wayne|Fresno|Galveston|
Galway|Glasgow|Green Bay|Halifax|Hartford|Hobart|Ithaca|Juneau|Kalamazoo|Knoxville|Lansing|
Laramie|Leeds|Lexington|Lincoln|Little Rock|Lubbock|Macon|Madison|Missoula|Mobile|Norfolk|
Ogden|Olympia|Omaha|Pensacola|Peoria|Perth|Portland|Providence|Provo|Pueblo|Raleigh|Reno|
Richmond|Roanoke|Rochester|Rockford|Salem|Santa Fe|Sarasota|Savannah|Scranton|Shreveport|
Sioux Falls|Spokane|Syracuse|Tacoma|Tallahassee|Toledo|Topeka|Trenton|Tucson|Tulsa|Victoria|
Waco|Wellington|Wichita|Winnipeg|Worcester""".replace("\n", "").split("|")

STREETS = """Main Street|Oak Avenue|Elm Street|Harbor Road|Mill Lane|Church Street|Maple Drive|
River Road|Station Street|Park Avenue|Cedar Lane|Market Street|Bridge Street|Hill Road|
Lake Drive|Union Street|Orchard Way|Canal Street|Forest Avenue|Walnut Street""".replace("\n", "").split("|")

# Invented small-town names for the travel pages: prefix + suffix.
PLACE_A = """Port Lake Cedar Stone Silver Maple Fox Eagle Willow Red Clear North Pine Granite Misty
Copper Sand Oak Elk Heron""".split()
PLACE_B = ["haven", "ridge", "field", "brook", "wood", "ford", "bay", "mouth", "crest", "hollow",
           " Springs", " Falls", " Harbor", " Valley", " Point"]

MONTHS = "January February March April May June July August September October November December".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
SEASONS = ["spring", "summer", "autumn", "winter"]


def person(r: random.Random) -> str:
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def place(r: random.Random) -> str:
    return r.choice(PLACE_A) + r.choice(PLACE_B)


def article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def money(n: int) -> str:
    return f"${n:,}"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def table(text: str) -> list[list[str]]:
    """Rows of ``a | b | c`` text: one subject per line, fields separated by '|'."""
    return [[f.strip() for f in line.split("|")] for line in text.strip().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# A page is a list of sentence templates plus the slot values that fill them. Keeping the
# two apart is what lets us re-render the same page with one slot swapped (templated).
# ---------------------------------------------------------------------------------------


@dataclass
class Page:
    genre: str
    subject: str  # the topic row it was built from; capped per genre so topics do not pile up
    sentences: list[str]  # templates with {slot} placeholders
    optional: list[bool]  # optional sentences are the ones a paraphrase may drop
    slots: dict[str, str]
    swappable: dict[str, str]  # slot name -> how to redraw it: "number", "person", ...
    extras: list[str] = field(default_factory=list)  # spare sentences a paraphrase may add

    def render(self, slots: dict[str, str] | None = None) -> list[str]:
        values = slots or self.slots
        return [s.format_map(values) for s in self.sentences]


def build(r: random.Random, genre: str, subject: str, parts: list[tuple[float, list[str]]], slots: dict[str, str],
          swappable: dict[str, str], extras: list[str]) -> Page:
    """Keep each sentence with its probability (1 = always), then cap the page at 6 sentences."""
    kept = [(r.choice(alts), p < 1) for p, alts in parts if r.random() < p][:6]
    return Page(genre, f"{genre}:{subject}", [t for t, _ in kept], [o for _, o in kept], slots, swappable, extras)


# ---------------------------------------------------------------------------------------
# Genres. Each subject table gives a page its topic-specific words; everything else is
# drawn from shared pools so that two pages rarely share most of their content.
# ---------------------------------------------------------------------------------------

PRODUCTS = table("""
cast iron skillet | searing steaks and baking cornbread | holds heat evenly across the whole pan | goes from the stovetop straight into the oven | builds a natural nonstick layer with every use | has a second handle for lifting it when full
hiking backpack | long day hikes and overnight trips | has a padded hip belt that takes weight off your shoulders | opens from both the top and the side | hides a rain cover in the bottom pocket | fits a three-liter water bladder
electric kettle | tea, pour-over coffee and instant noodles | boils a full liter in under four minutes | lets you pick the exact water temperature | shuts itself off when the pot runs dry | keeps water warm for half an hour
standing desk | working from home without a sore back | raises and lowers with one quiet motor | remembers four height presets | holds two large monitors without wobbling | has a cable tray hidden under the top
robot vacuum | keeping floors clean while you are out | maps each room with a laser sensor | empties itself into a sealed dock | climbs over rug edges and door sills | avoids socks and charging cables
noise-cancelling headphones | long flights and open-plan offices | block the drone of engines and air conditioners | last thirty hours on one charge | fold flat into a slim hard case | switch between your phone and laptop automatically
trail running shoe | muddy, rocky mountain paths | grips wet stone with deep rubber lugs | drains water through a mesh upper | protects your toes with a stiff bumper | weighs less than a paperback book
espresso machine | cafe-style drinks in a small kitchen | heats up in about forty seconds | steams milk with a manual wand | grinds beans fresh for every shot | has a pressure gauge on the front
camping tent | family weekends at the lake | sets up in five minutes with color-coded poles | sleeps four adults with room for bags | sheds heavy rain with a full-coverage fly | packs down into a duffel with handles
cordless drill | weekend furniture projects and repairs | drives long screws into hardwood | runs two hours on one battery | lights up the work with a small LED | comes with twenty bits in a case
yoga mat | daily stretching and hot yoga classes | stays grippy even when you sweat | cushions knees without feeling spongy | rolls up tight with an attached strap | is printed with alignment lines
air purifier | bedrooms during pollen and wildfire season | traps smoke and dust with a true HEPA filter | runs almost silently on its night setting | shows air quality with a colored light | cleans a large room five times an hour
electric toothbrush | people who want a dentist-clean feeling at home | pulses forty thousand times a minute | warns you when you brush too hard | times each quadrant of your mouth | charges on a travel case
acoustic guitar | beginners and campfire players | has a solid spruce top that sounds warm | stays in tune through long sessions | has low strings that are kind to new fingertips | comes with a padded gig bag
pressure cooker | fast beans, stews and stocks | cooks dried chickpeas in forty minutes | locks the lid until pressure drops | sautes and slow-cooks in the same pot | keeps food warm for hours
e-reader | reading in bed and on the beach | has a glare-free screen like real paper | lasts weeks on a single charge | survives being dropped in the bath | holds thousands of books
baby stroller | city walks and quick errands | folds with one hand in a second | turns sharply on narrow sidewalks | has a large basket for shopping | reclines almost flat for naps
garden hose reel | keeping long hoses tidy | winds the hose back by itself | mounts on a wall or stands alone | resists rust after years outdoors | includes a spray nozzle with eight patterns
mechanical keyboard | writers and programmers | has keys that click with a satisfying feel | lights each key with adjustable backlight | connects by cable or wireless | swaps keycaps without tools
smart thermostat | lowering heating and cooling bills | learns your schedule in a week | turns the heat down when you leave home | shows energy reports in an app | works with most furnaces
winter parka | bitter cold and snowy commutes | is filled with warm down insulation | has a hood lined with soft fleece | keeps wind out with a storm flap | has deep pockets for gloves
blender | smoothies, soups and nut butters | crushes ice in seconds | has a tamper for thick mixtures | heats soup through friction alone | cleans itself with soap and water
telescope | backyard stargazing | shows the rings of Saturn clearly | tracks stars with a motorized mount | sets up on a sturdy tripod | comes with a moon filter
office chair | long days at a desk | supports the lower back with an adjustable pad | lets the seat slide forward and back | has breathable mesh in the back | rolls smoothly on carpet and wood
food dehydrator | jerky, dried fruit and herbs | has six stackable trays | holds a steady low temperature | runs on a timer overnight | is easy to wash by hand
digital camera | travel and family photos | shoots sharp pictures in dim light | records smooth video | has a flip screen for selfies | fits in a jacket pocket
sewing machine | hemming, quilting and small repairs | threads the needle automatically | offers over sixty stitch styles | sews through thick denim | has a free arm for sleeves
bike helmet | commuting and weekend rides | has a rear light built into the strap | vents air through twenty channels | adjusts with a dial at the back | meets strict safety standards
water filter pitcher | cleaner tasting tap water | removes chlorine and lead | filters a full jug in minutes | fits in a refrigerator door | shows when the filter needs changing
kayak | calm lakes and slow rivers | tracks straight with a small skeg | has a dry hatch for gear | weighs little enough to carry alone | has an adjustable padded seat
rice cooker | perfect rice every night | cooks white, brown and sushi rice | keeps rice warm without drying it | steams vegetables in a basket | has a nonstick bowl
portable generator | camping trips and power outages | runs a refrigerator for a day | is quiet enough for campgrounds | starts with a push button | has USB ports for phones
wool blanket | cold nights in drafty houses | is woven from soft merino wool | stays warm even when damp | is machine washable on a wool cycle | is made by a small family mill
baby monitor | keeping an eye on sleeping infants | streams clear night vision video | alerts you to crying sounds | plays lullabies remotely | has a long battery life
paddle board | flat-water paddling and yoga | inflates in ten minutes | is stable even for beginners | rolls into a backpack | comes with an adjustable paddle
label printer | organizing pantries and offices | prints from your phone | uses waterproof labels | cuts each label automatically | needs no ink
dash cam | recording accidents on the road | records in full high definition | saves clips when it senses impact | sees clearly at night | mounts behind the mirror
snow blower | clearing long driveways | throws snow thirty feet | has heated handles | drives itself forward | lights the path with LED lamps
knife set | home cooks who want sharp tools | includes a chef's knife and bread knife | is forged from high-carbon steel | sits in a wooden block | stays sharp with a honing rod
fitness tracker | counting steps and sleep | tracks heart rate all day | shows messages on your wrist | is waterproof for swimming | lasts a week per charge
""")

BRANDS = """Northwind|Alder & Co|Bluepeak|Corvid|Driftline|Emberly|Fernhill|Goldcrest|Halcyon|Ironbark|
Juniper Works|Kestrel|Lumen|Meridian|Nimbus|Oakridge|Pinecone|Quarry|Redwood Supply|Solstice|
Tidewater|Umbra|Vantage|Wildroot|Yellowfin|Zephyr""".replace("\n", "").split("|")


def gen_product(r: random.Random) -> Page:
    item, use, *feats = r.choice(PRODUCTS)
    f1, f2 = r.sample(feats, 2)
    slots = dict(brand=r.choice(BRANDS), item=item, use=use, f1=f1, f2=f2,
                 model=f"{r.choice('ABCDKMRSTX')}{r.randint(10, 990)}",
                 color=r.choice(["slate gray", "forest green", "matte black", "sand", "navy blue", "brick red", "white"]),
                 price=money(r.choice([19, 24, 39, 49, 59, 79, 99, 129, 149, 199, 249, 349])),
                 years=str(r.randint(1, 5)), stars=r.choice(["4.2", "4.5", "4.7", "4.8", "4.9"]))
    parts = [
        (1, ["The {brand} {item} is designed for {use}.", "Meet the {brand} {item}, made for {use}.",
             "If you need something for {use}, the {brand} {item} is worth a look."]),
        (1, ["It {f1}.", "The first thing you notice is that it {f1}.", "Our favorite detail: it {f1}."]),
        (0.8, ["It also {f2}.", "On top of that, it {f2}.", "Better still, it {f2}."]),
        (0.5, ["Model {model} comes in {color}.", "The {model} version is available in {color}."]),
        (0.7, ["The price is {price}, and every order includes a {years}-year warranty.",
               "Buy it now for {price} with free shipping.", "It sells for {price} online and in stores."]),
        (0.4, ["Reviewers give it an average of {stars} stars.", "Buyers rate it {stars} out of five."]),
    ]
    extras = ["Returns are free within thirty days.", "Spare parts are sold separately on our site.",
              "It ships in recyclable cardboard packaging."]
    swappable = {"model": "number", "price": "number", "years": "number"}
    return build(r, "product", item, parts, slots, swappable, extras)


BUSINESSES = table("""
bakery | Bakery | sourdough loaves | rye bread | cinnamon rolls | fruit tarts | custom birthday cakes | gluten-free muffins
plumbing company | Plumbing | leak repair | water heater installation | drain cleaning | sump pump service | bathroom remodels | frozen pipe repair
dental clinic | Dental | routine cleanings | teeth whitening | children's checkups | dental implants | emergency tooth repair | clear aligners
auto repair shop | Auto Care | brake replacement | oil changes | engine diagnostics | tire rotation | transmission repair | air conditioning service
hair salon | Hair Studio | precision haircuts | color and highlights | bridal styling | keratin treatments | beard trims | curly hair cuts
veterinary clinic | Animal Hospital | vaccinations | dental care for pets | spay and neuter surgery | senior pet exams | microchipping | exotic bird care
roofing contractor | Roofing | shingle replacement | storm damage repair | gutter installation | skylight sealing | metal roofs | roof inspections
law office | Law Group | estate planning | divorce and custody | small business contracts | traffic tickets | real estate closings | wills and trusts
yoga studio | Yoga | beginner flow classes | hot yoga | prenatal yoga | meditation workshops | private sessions | teacher training
landscaping service | Landscapes | lawn mowing | garden design | tree trimming | patio installation | irrigation systems | leaf removal
moving company | Movers | local apartment moves | long-distance relocation | piano moving | packing services | storage units | office moves
pizza restaurant | Pizza | wood-fired pies | gluten-free crusts | calzones | garlic knots | late-night delivery | craft beer on tap
bookstore | Books | new releases | used paperbacks | children's story hour | rare first editions | author readings | book club discounts
electrician | Electric | panel upgrades | ceiling fan installation | outdoor lighting | electric car chargers | rewiring old homes | generator hookups
flower shop | Flowers | wedding bouquets | sympathy arrangements | potted orchids | same-day delivery | dried flower wreaths | weekly office flowers
coffee roaster | Coffee Roasters | single-origin beans | cold brew | espresso blends | barista classes | wholesale for cafes | decaf done right
tax preparation office | Tax Services | personal tax returns | small business bookkeeping | IRS audit help | payroll | quarterly estimates | retirement planning
daycare center | Early Learning | infant care | toddler programs | preschool readiness | after-school care | healthy lunches | summer camp
gym | Fitness | weight training | spin classes | personal trainers | boxing classes | a heated lap pool | group bootcamps
tailor | Alterations | wedding dress fittings | suit tailoring | hemming jeans | zipper replacement | leather repair | custom shirts
pest control company | Pest Control | termite treatment | ant and roach control | mouse removal | bed bug inspections | wasp nest removal | wildlife exclusion
print shop | Print & Copy | business cards | wedding invitations | banners and signs | posters | bound reports | custom stickers
music school | School of Music | piano lessons | guitar lessons | voice coaching | drum lessons | music theory | student recitals
bike shop | Cycles | tune-ups | flat tire repair | electric bike sales | custom wheel builds | bike fittings | group rides
optometrist | Eye Care | eye exams | contact lens fittings | designer frames | children's vision tests | glaucoma screening | sports goggles
cleaning service | Cleaning Co | weekly house cleaning | move-out cleaning | carpet shampooing | window washing | office cleaning | deep kitchen cleaning
butcher shop | Meats | dry-aged steaks | house-made sausages | whole chickens | smoked bacon | custom cuts | holiday roasts
dog grooming salon | Pet Grooming | baths and blow-drys | nail trims | breed-specific cuts | de-shedding treatments | teeth brushing | puppy first grooms
physical therapy clinic | Physical Therapy | sports injury rehab | back pain treatment | post-surgery recovery | balance training | dry needling | workplace injury care
hardware store | Hardware | key cutting | paint mixing | tool rental | lawn and garden supplies | screen repair | propane refills
""")

HOURS = ["Monday through Friday from 8 to 6", "seven days a week", "every day except Sunday",
         "Tuesday through Saturday from 10 to 7", "weekdays and Saturday mornings"]


def gen_business(r: random.Random) -> Page:
    kind, label, *services = r.choice(BUSINESSES)
    s1, s2, s3 = r.sample(services, 3)
    owner = r.choice(LAST)
    street_word = r.choice(STREETS).split()[0]
    nickname = r.choice(["Blue Door", "Golden Hour", "Northside", "Two Rivers", "Evergreen", "Keystone"])
    name = r.choice([f"{owner} {label}", f"{owner} & Sons {label}", f"{street_word} Street {label}", f"{nickname} {label}"])
    slots = dict(name=name, kind=kind, city=r.choice(CITIES), year=str(r.randint(1952, 2019)),
                 s1=s1, s2=s2, s3=s3, num=str(r.randint(12, 2900)), street=r.choice(STREETS),
                 hours=r.choice(HOURS), phone=str(r.randint(1000, 9999)), owner=f"{r.choice(FIRST)} {owner}")
    parts = [
        (1, ["{name} is a family-owned {kind} in {city}.", "Welcome to {name}, a {kind} serving {city} since {year}.",
             "Looking for a {kind} in {city}? {name} has been here since {year}."]),
        (1, ["We specialize in {s1} and {s2}.", "Our team is known for {s1}, {s2} and {s3}.",
             "Customers come to us for {s1}, and many stay for our {s2}."]),
        (0.6, ["You can find us at {num} {street} in {city}.", "Visit our shop at {num} {street}, {city}."]),
        (0.6, ["We are open {hours}.", "Our doors are open {hours}."]),
        (0.5, ["Call 555-{phone} today to book an appointment.", "Call 555-{phone} or stop by to learn more about {s3}."]),
        (0.3, ["Owner {owner} still greets most customers personally.",
               "{owner} started the business after years in the trade."]),
    ]
    extras = ["Free parking is available behind the building.", "We are proud to serve our neighbors.",
              "Gift cards are available at the front counter."]
    swappable = {"year": "year", "num": "number", "street": "street", "phone": "number", "owner": "person"}
    return build(r, "business", kind, parts, slots, swappable, extras)


RECIPE_MAINS = table("""
chickpea | cumin | lemon | spinach | tahini
lentil | carrots | smoked paprika | onion | thyme
mushroom | garlic | thyme | cream | parsley
pumpkin | sage | nutmeg | brown butter | pecans
salmon | dill | capers | lemon zest | cucumber
chicken thigh | ginger | soy sauce | scallions | honey
eggplant | miso | sesame | chili | basil
sweet potato | black beans | lime | cilantro | chipotle
shrimp | garlic | white wine | cherry tomatoes | parsley
tofu | ginger | peanut sauce | broccoli | rice vinegar
cauliflower | turmeric | coconut milk | peas | mustard seeds
zucchini | mint | feta | lemon | pine nuts
beef | red wine | rosemary | carrots | pearl onions
pork shoulder | apple cider | fennel | mustard | sage
corn | jalapeno | lime | cotija cheese | chili powder
spinach | ricotta | nutmeg | parmesan | garlic
butternut squash | maple syrup | sage | goat cheese | walnuts
white bean | kale | rosemary | garlic | parmesan rind
tomato | basil | mozzarella | olive oil | balsamic vinegar
cod | potatoes | leeks | bay leaf | cream
""")

RECIPE_FORMS = table("""
soup | Simmer everything in stock for about half an hour, then blend part of the pot for body. | Stir in the greens just before serving so they stay bright.
curry | Toast the spices in oil until fragrant, then add the rest and let it bubble gently. | Finish with a squeeze of lime to wake up the sauce.
salad | Roast the main ingredient until the edges brown, then toss it warm with the dressing. | Let it sit ten minutes so the flavors soak in.
stir-fry | Get the wok smoking hot and cook in small batches so nothing steams. | Add the sauce last and toss just until glossy.
tart | Press the pastry into a tin, blind bake it, then spread the filling in an even layer. | Bake until the top is set and golden at the edges.
stew | Brown everything in batches, then cover and cook low and slow until very tender. | It tastes even better the next day.
pasta bake | Boil the pasta two minutes short, mix it with the sauce and top it with cheese. | Bake uncovered until bubbling and crisp on top.
tacos | Cook the filling in a hot pan until charred in spots, then pile it into warm tortillas. | Top with a quick pickled onion and plenty of herbs.
risotto | Add hot stock one ladle at a time, stirring until each addition is absorbed. | Beat in butter and cheese off the heat for a creamy finish.
fritters | Mix everything into a thick batter, then fry spoonfuls in shallow oil until crisp. | Drain them on a rack so they stay crunchy.
grain bowl | Cook a pot of farro or rice, then arrange the toppings in sections over it. | Drizzle the sauce over everything right before eating.
skewers | Marinate the pieces for at least an hour, then thread them onto soaked sticks. | Grill over high heat, turning every couple of minutes.
""")

SIDES = ["crusty bread", "steamed rice", "a green salad", "warm flatbread", "roasted potatoes", "buttered noodles",
         "quick-pickled cucumbers", "a fried egg on top", "polenta"]


# How the main ingredient reads in a shopping list, where it differs from the dish name.
SHOPPING = {"chickpea": "chickpeas", "lentil": "lentils", "mushroom": "mushrooms", "chicken thigh": "chicken thighs",
            "white bean": "white beans", "tomato": "ripe tomatoes", "sweet potato": "sweet potatoes",
            "salmon": "salmon fillets", "cod": "cod fillets", "beef": "beef chuck"}


def gen_recipe(r: random.Random) -> Page:
    main, *partners = r.choice(RECIPE_MAINS)
    form, method, finish = r.choice(RECIPE_FORMS)
    p1, p2, p3 = r.sample(partners, 3)
    slots = dict(dish=f"{main} {form}", main=SHOPPING.get(main, main), p1=p1, p2=p2, p3=p3, method=method, finish=finish,
                 minutes=str(r.choice([20, 25, 30, 35, 40, 45, 60, 90])), servings=str(r.randint(2, 8)),
                 cook=r.choice(FIRST), side=r.choice(SIDES), days=str(r.randint(2, 5)),
                 adj=r.choice(["cozy", "bright", "hearty", "light", "comforting", "zesty", "rich"]))
    parts = [
        (1, ["This {dish} is {adj} and ready in about {minutes} minutes.",
             "{cook}'s {dish} has become a weeknight favorite in our house.",
             "Here is a simple {dish} that feeds {servings} people."]),
        (1, ["You will need {main}, {p1}, {p2} and a little olive oil.",
             "The shopping list is short: {main}, {p1} and {p2}."]),
        (1, ["{method}"]),
        (0.6, ["{finish}", "Season with {p3} at the end and taste for salt."]),
        (0.5, ["Serve it with {side}.", "We like it with {side} on the side."]),
        (0.3, ["Leftovers keep in the fridge for {days} days.", "It freezes well for up to {days} weeks."]),
    ]
    extras = ["Double the batch if you are feeding a crowd.", "Any leftovers make a great lunch the next day."]
    swappable = {"minutes": "number", "servings": "number", "days": "number"}
    return build(r, "recipe", slots["dish"], parts, slots, swappable, extras)


NEWS = table("""
a new branch of the public library | give the east side a quiet place to study | will raise property taxes by a small amount
repairs to the aging river bridge | end years of weight limits for trucks | will close the main crossing for months
a ban on gas-powered leaf blowers | cut noise and air pollution in neighborhoods | hurts small landscaping businesses
a protected bike lane downtown | make cycling safer for commuters | removes dozens of parking spaces
a curfew for teenagers on weekends | reduce late-night vandalism | punishes young people who have done nothing wrong
a new dog park near the fairgrounds | give pet owners a safe off-leash area | was placed too close to homes
the expansion of the regional airport | bring more direct flights and jobs | will add noise over nearby schools
a four-day school week | save money on buses and heating | leaves working parents scrambling for childcare
rent control for older apartments | keep long-time tenants from being priced out | discourages landlords from making repairs
a tax on sugary drinks | fund school nutrition programs | falls hardest on low-income families
solar panels on every city building | cut the city's power bill by a third | costs too much up front
a homeless shelter in the old armory | give hundreds of people a warm bed in winter | was decided without asking neighbors
the closing of the public pool | save the city a million dollars a year | leaves children with nowhere to swim
a new minor league baseball stadium | draw visitors downtown on summer nights | uses public money for a private team
fluoride in the city water supply | protect children's teeth | takes away residents' choice
a speed camera program near schools | slow drivers in school zones | is mainly a way to raise money
turning an old rail line into a walking trail | connect three neighborhoods with a car-free path | invites crime behind backyards
a ban on plastic shopping bags | keep litter out of the river | annoys shoppers and burdens grocers
raising the pay of city firefighters | stop experienced crews from leaving for other towns | strains an already tight budget
a new water treatment plant | end boil-water notices for good | will double monthly water bills
""")


def gen_news(r: random.Random) -> Page:
    project, benefit, concern = r.choice(NEWS)
    yes = r.randint(4, 7)
    slots = dict(project=project, benefit=benefit, concern=concern, city=r.choice(CITIES), yes=str(yes),
                 no=str(r.randint(1, yes - 1)), weekday=r.choice(WEEKDAYS[:5]), mayor=person(r),
                 amount=str(r.randint(2, 60)), month=r.choice(MONTHS), season=r.choice(SEASONS),
                 resident=person(r), age=str(r.randint(24, 81)))
    parts = [
        (1, ["The {city} city council voted {yes} to {no} on {weekday} to approve {project}.",
             "Officials in {city} said {weekday} that {project} will move forward this {season}.",
             "Residents of {city} packed a meeting on {weekday} night to argue over {project}."]),
        (1, ["Supporters say it will {benefit}.", "Backers hope the plan will {benefit}."]),
        (0.8, ["Critics say it {concern}.", "Opponents argue that it {concern}."]),
        (0.6, ["The work is expected to cost about ${amount} million.", "The city has set aside ${amount} million for it."]),
        (0.5, ["Mayor {mayor} called the decision long overdue.", "Mayor {mayor} said more public hearings would follow."]),
        (0.3, ["\"We deserve a say in this,\" said {resident}, {age}, who has lived in {city} for decades."]),
    ]
    extras = ["A final vote is expected next month.", "The full proposal is posted on the city website."]
    swappable = {"amount": "number", "mayor": "person", "resident": "person"}
    return build(r, "news", project, parts, slots, swappable, extras)


HOWTO = table("""
unclog a bathroom sink | pull out the stopper and clear the hair wrapped around it | pour a kettle of very hot water down the drain | work a small plunger with a wet rag over the overflow hole | Skip harsh chemical cleaners, which can eat through old pipes.
remove a red wine stain from carpet | blot up as much wine as you can with a dry towel | sprinkle salt or baking soda over the spot | dab it with cold water and a drop of dish soap | Never rub the stain, because that pushes it deeper into the fibers.
sharpen a kitchen knife on a whetstone | soak the stone in water for ten minutes | hold the blade at a steady, shallow angle | sweep the edge across the stone in long strokes on both sides | A few passes on a leather strop at the end give a polished edge.
patch a small hole in drywall | cut the damaged edges clean with a utility knife | cover the hole with a self-adhesive mesh patch | spread two thin coats of joint compound and sand smooth | Prime the patch before painting or it will show through.
start a compost pile | pick a shady spot with good drainage | layer green kitchen scraps with brown leaves and cardboard | turn the pile with a fork every week or two | Leave out meat and dairy, which attract rats.
change a flat tire | loosen the lug nuts before you jack up the car | lift the car at the marked jack point and swap the wheel | tighten the nuts in a star pattern | Check the spare's pressure a few times a year.
descale a coffee maker | fill the tank with equal parts water and white vinegar | run half a cycle and let it sit for an hour | finish the cycle and run two rounds of clean water | Doing this monthly keeps your coffee from tasting bitter.
fix a squeaky door hinge | lift out the hinge pin with a nail and hammer | rub the pin with petroleum jelly or a drop of oil | tap the pin back in and swing the door a few times | Bar soap works in a pinch if you have no oil.
clean a cast iron pan | scrape out food while the pan is still warm | scrub with hot water and coarse salt | dry it on the burner and wipe on a thin layer of oil | A little soap now and then will not ruin the seasoning.
get rid of fruit flies | pour apple cider vinegar into a small jar | add a drop of dish soap to break the surface | cover the jar with plastic wrap poked with tiny holes | Take out the compost and rinse recycling to stop new flies.
hang a heavy mirror | find a wall stud with a stud finder | drive a picture hook screw into the stud | use a level before the second hook goes in | Drywall anchors rated for the weight work if there is no stud.
bleed a radiator | turn the heating off and let the radiators cool | open the bleed valve with a radiator key over a cloth | close it as soon as water starts to drip | Check the boiler pressure afterward and top it up if needed.
reseal a bathtub | cut out the old caulk with a razor scraper | clean the joint with rubbing alcohol and let it dry | run a steady bead of silicone and smooth it with a wet finger | Fill the tub with water first so the seal cures under load.
wash a down jacket | close all zips and use a gentle down wash | run it on a cool, slow cycle with an extra rinse | tumble dry on low with three tennis balls | It can take several hours to dry fully.
repot a houseplant | pick a pot only a few centimeters wider than the old one | loosen the root ball and trim any mushy roots | set it at the same depth and water it well | Spring is the best time, when the plant is actively growing.
jump-start a car battery | connect red to the dead battery's positive post, then to the good one | attach black to the good battery and to bare metal on the dead car | start the working car and wait a few minutes | Remove the cables in the reverse order.
remove rust from garden tools | soak the metal parts overnight in white vinegar | scrub the loosened rust with steel wool | dry them and wipe on a light coat of oil | Store tools in a bucket of oiled sand to keep them clean.
speed up a slow laptop | uninstall programs you no longer use | stop apps from launching at startup | clear space so the drive is less than ninety percent full | An upgrade to a solid-state drive helps more than anything else.
iron a dress shirt | start with the collar and cuffs while the shirt is damp | press the yoke and then the sleeves | finish with the front and back panels | Hang it immediately so it does not wrinkle again.
clean window screens | lift the screens out and lay them on a towel | scrub gently with a soft brush and soapy water | rinse with a hose and let them dry in the sun | Do this before spring pollen season.
winterize an outdoor faucet | shut off the indoor valve that feeds the faucet | open the outdoor tap to drain the line | fit an insulated cover over the spout | Disconnect hoses so trapped water cannot freeze.
paint a room without streaks | wash the walls and tape the trim | cut in the edges with a brush before rolling | roll in a W pattern while the paint is still wet | Two thin coats always look better than one thick one.
""")


def gen_howto(r: random.Random) -> Page:
    task, a, b, c, tip = r.choice(HOWTO)
    slots = dict(task=task, a=a, b=b, c=c, tip=tip, minutes=str(r.choice([5, 10, 15, 20, 30, 45])),
                 author=person(r), city=r.choice(CITIES), cost=str(r.randint(3, 40)))
    parts = [
        (1, ["Here is how to {task} in about {minutes} minutes.", "Want to {task} without calling a professional?",
             "Learning to {task} will save you money."]),
        (1, ["First, {a}.", "Start by making sure you {a}.", "Step one: {a}."]),
        (1, ["Next, {b}.", "Then {b}.", "After that, {b}."]),
        (0.8, ["Finally, {c}.", "To finish, {c}.", "Last of all, {c}."]),
        (0.6, ["{tip}"]),
        (0.3, ["This tip came from {author} in {city}.", "Reader {author} says the supplies cost under ${cost}."]),
    ]
    extras = ["Take your time and work carefully.", "Always wear gloves when you do this."]
    swappable = {"minutes": "number", "cost": "number", "author": "person"}
    return build(r, "howto", task, parts, slots, swappable, extras)


FORUM = table("""
sourdough starter | bread bakers | smells like nail polish remover after a few days | feeding it twice a day with whole wheat flour
aquarium | fishkeepers | turns cloudy and green every two weeks | doing partial water changes and cutting back on food
tomato plants | vegetable gardeners | get yellow leaves with brown spots from the bottom up | watering only at the base in the morning
gaming PC | PC builders | crashes to a black screen during demanding games | reinstalling the graphics drivers and checking temperatures
road bike | cyclists | makes a clicking noise every pedal stroke | tightening the pedals and greasing the seat post
home wifi | home networking folks | drops out every evening around eight | moving the router and changing the channel
fiddle leaf fig | houseplant people | keeps dropping its big leaves | moving it closer to the window and watering less
espresso grinder | coffee nerds | produces shots that run way too fast | grinding finer and using fresher beans
vegetable garden soil | gardeners | stays waterlogged after every rain | adding compost and digging in sand
knitted sweater | knitters | comes out much bigger than the pattern size | swatching with a smaller needle
lawn | lawn care fans | has dead patches shaped like circles | watering deeper and less often
cat | cat owners | keeps peeing outside the litter box | switching litter and adding a second box
puppy | dog owners | bites our hands constantly during play | yelping and walking away when it happens
chickens | backyard chicken keepers | stopped laying eggs in the middle of summer | adding oyster shell and extra protein
hot water heater | homeowners | makes loud popping sounds when it heats | flushing the tank once
car | car owners | squeals loudly when I start it on cold mornings | checking the belt tension
laptop battery | tech help | dies from full to empty in under an hour | calibrating it and turning down the screen brightness
running training | runners | leaves my shins sore after every long run | buying new shoes and stretching more
3D printer | makers | prints that peel off the bed halfway through | cleaning the bed and leveling it again
beehive | beekeepers | has fewer bees flying every week | checking for mites and feeding sugar syrup
violin | string players | buzzes on the G string | loosening and retuning all the strings
phone camera | photography beginners | takes blurry pictures indoors | cleaning the lens and holding my breath
smoker grill | barbecue fans | can't hold a steady temperature for long cooks | adjusting the vents and using better charcoal
resume | job seekers | never gets any callbacks | rewriting it twice and adding keywords
""")


def gen_forum(r: random.Random) -> Page:
    thing, community, symptom, tried = r.choice(FORUM)
    user = r.choice(["quietfox", "rustybucket", "ladybird", "greenthumb", "nightowl", "pixelpusher", "maplebear",
                     "saltyseal", "tinkerer", "wanderer", "breadhead", "cloudrider"]) + str(r.randint(2, 999))
    slots = dict(thing=thing, community=community, symptom=symptom, tried=tried, user=user,
                 weeks=str(r.randint(2, 9)), city=r.choice(CITIES), years=str(r.randint(2, 15)))
    parts = [
        (0.8, ["Quick question for the {community} here.", "Long time lurker, first post.",
               "Hoping someone in this group of {community} can help."]),
        (1, ["My {thing} {symptom}.", "For the past {weeks} weeks my {thing} {symptom}.",
             "Has anyone else had a {thing} that {symptom}?"]),
        (1, ["I already tried {tried}, but nothing changed.", "So far I have tried {tried} with no luck."]),
        (0.5, ["I have been doing this for {years} years and never saw this before.",
               "I'm in {city}, in case the climate matters."]),
        (0.6, ["Any advice would be appreciated.", "What am I missing?", "Thanks in advance!"]),
        (0.4, ["- {user}", "Posted by {user}"]),
    ]
    extras = ["Pictures are attached below.", "Update: still happening as of today."]
    swappable = {"weeks": "number", "years": "number", "user": "handle"}
    return build(r, "forum", thing, parts, slots, swappable, extras)


EVENTS = table("""
spring craft fair | handmade jewelry | pottery | quilts | wooden toys | candles
charity 5K fun run | a kids' dash | a pancake breakfast after the race | medals for every finisher | a costume contest | live drumming on the course
jazz festival | three stages of live music | food trucks | a late-night jam session | workshops for young players | a swing dance lesson
farmers market opening day | local honey | fresh strawberries | baked goods | cut flowers | goat cheese
used book sale | thousands of donated books | vinyl records | a children's corner | rare maps | puzzles
science fair | student projects | a robot demonstration | a telescope viewing | liquid nitrogen ice cream | prizes for every grade
classic car show | restored muscle cars | vintage motorcycles | a swap meet for parts | a rock and roll band | a best-in-show trophy
holiday lights parade | lighted floats | marching bands | hot cocoa stands | a visit from Santa | carolers
chili cook-off | two dozen chili recipes | a people's choice vote | cornbread | a hot sauce tasting | a bluegrass band
community cleanup day | trash pickup along the river | tree planting | free gloves and bags | a volunteer lunch | a recycling drop-off
film night in the park | a family movie on a giant screen | popcorn | lawn chairs | glow sticks for kids | a short film by local students
beer and cider festival | tastings from thirty breweries | cider from local orchards | a pretzel stand | lawn games | live folk music
adoption event for shelter pets | dogs and cats looking for homes | reduced adoption fees | free microchips | training tips | treats for visitors
quilt show | over two hundred quilts | a raffle quilt | demonstrations of hand stitching | vendors selling fabric | a vintage quilt exhibit
poetry slam | open mic readings | a headline poet | a youth category | cash prizes | coffee and pastries
Lunar New Year celebration | a lion dance | dumpling making | paper lantern crafts | calligraphy | firecrackers at dusk
blood drive | quick donor screenings | snacks after donating | a free t-shirt | walk-in appointments | a goal of a hundred pints
gardening expo | seed swaps | talks on native plants | tool sharpening | plant sales | a compost demonstration
model train show | operating layouts | trains for sale | a kids' play table | repair clinics | rare locomotives
harvest festival | hayrides | apple cider pressing | a corn maze | pumpkin carving | a pie contest
""")

VENUES = ["the county fairgrounds", "Riverside Park", "the old train depot", "the high school gym", "the public library",
          "City Hall plaza", "the community center", "the waterfront pavilion", "St. Mark's church hall", "the town green"]
CAUSES = ["local food bank", "animal shelter", "children's hospital", "public library fund", "volunteer fire department",
          "youth sports league", "river restoration project"]


def gen_event(r: random.Random) -> Page:
    event, *acts = r.choice(EVENTS)
    a1, a2, a3 = r.sample(acts, 3)
    slots = dict(event=event, a1=a1, a2=a2, a3=a3, venue=r.choice(VENUES), city=r.choice(CITIES),
                 nth=ordinal(r.randint(2, 40)), month=r.choice(MONTHS), day=str(r.randint(1, 28)),
                 weekday=r.choice(WEEKDAYS[4:]), time=r.choice(["9 am", "10 am", "noon", "3 pm", "5 pm", "6:30 pm"]),
                 price=money(r.choice([5, 8, 10, 12, 15, 20, 25])), age=str(r.choice([5, 10, 12])),
                 cause=r.choice(CAUSES), contact=person(r))
    parts = [
        (1, ["Join us for the {nth} annual {event} at {venue} in {city}.", "The {event} returns to {city} on {month} {day}.",
             "Mark your calendar: the {city} {event} is back."]),
        (1, ["Expect {a1}, {a2} and {a3}.", "This year brings {a1} and {a2}, plus {a3}.",
             "Highlights include {a1} and {a2}."]),
        (0.7, ["Gates open at {time} on {weekday}, {month} {day}.", "It starts at {time} at {venue}."]),
        (0.6, ["Tickets are {price} for adults and free for children under {age}.", "Admission is {price} at the door."]),
        (0.5, ["All proceeds go to the {cause}.", "Money raised will support the {cause}."]),
        (0.3, ["Volunteers can sign up with {contact}.", "Questions? Contact organizer {contact}."]),
    ]
    extras = ["The event happens rain or shine.", "Parking is free on nearby streets."]
    swappable = {"nth": "ordinal", "day": "day", "price": "number", "contact": "person"}
    return build(r, "event", event, parts, slots, swappable, extras)


TRAVEL = table("""
coastal fishing village | a working harbor full of lobster boats | a red-and-white lighthouse | seafood shacks on the pier | kayaking among the islands | watching storms roll in
desert canyon town | slot canyons carved by flash floods | petroglyphs left by ancient peoples | night skies full of stars | canyoneering with a guide | soaking in hot springs
mountain ski village | steep powder runs | a gondola to the summit | cozy lodges with fireplaces | backcountry skiing | summer wildflower hikes
wine valley town | family vineyards | tasting rooms in old barns | farm-to-table restaurants | cycling between wineries | the grape harvest in autumn
island getaway | white sand beaches | coral reefs close to shore | a car-free main street | snorkeling with sea turtles | sunset sailing
river gorge town | towering waterfalls | a historic covered bridge | trails along the cliffs | whitewater rafting | fly fishing
old mining town | a preserved opera house | a tour deep into a silver mine | saloons from the gold rush days | ghost town visits | panning for gold
lakeside village | a chain of clear glacial lakes | rental cabins on the shore | a classic steamboat | canoeing from lake to lake | ice fishing in winter
college town | a lively arts scene | bookstores and record shops | a farmers market every Saturday | catching a football game | live music most nights
prairie town | endless wheat fields | a bison preserve | a small-town rodeo | birdwatching in the wetlands | storm chasing tours
rainforest coast town | giant moss-covered trees | tide pools full of starfish | a hot spring in the woods | surfing cold waves | spotting whales on migration
volcanic highland village | steaming lava fields | a crater lake | black sand beaches | hiking to the volcano rim | dipping in geothermal pools
historic river port | cobblestone streets | riverboats with paddle wheels | a museum of river trade | ghost walking tours | jazz clubs by the water
alpine lake resort | a lake so clear you can see the bottom | a lakeside promenade | rowboat rentals | mountain biking | snowshoeing
cattle ranching town | working ranches | a cowboy museum | steakhouses with live fiddle music | horseback riding | sleeping under the stars
""")


def gen_travel(r: random.Random) -> Page:
    land, *rest = r.choice(TRAVEL)
    draws, acts = rest[:3], rest[3:]
    d1, d2 = r.sample(draws, 2)
    slots = dict(town=place(r), land=land, a_land=article(land), d1=d1, d2=d2, act1=acts[0], act2=acts[1],
                 region=r.choice(["the north", "the far west", "the south", "the hill country", "the eastern highlands"]),
                 nights=str(r.randint(2, 7)), inn=f"{r.choice(LAST)} Inn", price=money(r.choice([89, 110, 135, 160, 220])),
                 season=r.choice(["late spring", "early autumn", "midsummer", "the shoulder season"]))
    parts = [
        (1, ["{town} is {a_land} in {region} that most travelers drive right past.",
             "Few places feel as relaxed as {town}, {a_land} tucked away in {region}.",
             "If you want a quiet {land}, put {town} on your list."]),
        (1, ["The main draws are {d1} and {d2}.", "Visitors come for {d1} and stay for {d2}."]),
        (0.8, ["Popular things to do include {act1} and {act2}.", "Try {act1}, or {act2} if the weather turns."]),
        (0.5, ["Plan to stay at least {nights} nights.", "Give {town} {nights} nights and you will want more."]),
        (0.5, ["Rooms at the {inn} start around {price} a night.", "The {inn} is the best base, from {price} a night."]),
        (0.4, ["The best time to visit is {season}.", "Go in {season}, when the crowds are gone."]),
    ]
    extras = ["Bring good walking shoes.", "Book early, since rooms fill up quickly."]
    swappable = {"nights": "number", "price": "number"}
    return build(r, "travel", land, parts, slots, swappable, extras)


JOBS = table("""
registered nurse | care for patients on a busy medical floor | give medications and track vital signs | a current nursing license | calm judgment under pressure
warehouse associate | pick and pack customer orders | load trucks and keep aisles organized | the ability to lift fifty pounds | a steady work ethic
software developer | build features for our web application | review code and write tests | experience with Python or JavaScript | a habit of writing clear documentation
line cook | prepare dishes on the grill and saute stations | keep the kitchen clean and stocked | two years of restaurant experience | speed during the dinner rush
truck driver | haul freight across the region | inspect the truck before every trip | a commercial driver's license | a clean driving record
bookkeeper | manage accounts payable and receivable | reconcile bank statements each month | experience with accounting software | attention to detail
elementary school teacher | teach reading and math to third graders | plan lessons and meet with parents | a teaching certificate | patience and creativity
electrician apprentice | help install wiring in new homes | learn the electrical code on the job | a high school diploma | a willingness to learn
dental hygienist | clean teeth and take x-rays | teach patients about oral health | a hygiene license | a gentle touch
graphic designer | design logos, packaging and social posts | work closely with our marketing team | a strong portfolio | skill with design software
customer service representative | answer calls and emails from customers | solve billing questions | a friendly phone voice | basic computer skills
mechanic | diagnose and repair cars and light trucks | perform routine maintenance | a full set of hand tools | a state inspection license
barista | make espresso drinks and pour-over coffee | open or close the cafe | a love of coffee | a cheerful attitude
data analyst | turn messy data into clear reports | build dashboards for managers | strong SQL skills | curiosity about numbers
landscaper | mow, trim and plant on residential jobs | operate small equipment safely | a driver's license | comfort working outdoors
pharmacy technician | fill prescriptions accurately | help customers at the counter | technician certification | precision and care
social media manager | plan and post content on our channels | track engagement and grow our audience | strong writing | an eye for trends
welder | fabricate steel parts from drawings | weld in flat and overhead positions | welding certification | the ability to read blueprints
veterinary assistant | restrain and comfort animals during exams | clean kennels and surgical tools | a love of animals | reliability
carpenter | frame walls and install trim | read plans on residential builds | five years of experience | reliable transportation
""")

COMPANIES = ["Brightline", "Harbor & Pine", "Summit Partners", "Cedar Health", "Riverbend Foods", "Keystone Logistics",
             "Northstar Labs", "Bluebird Group", "Ironwood Builders", "Sunrise Care", "Granite Works", "Willow Systems"]
PERKS = ["health insurance", "a retirement plan with matching", "paid time off from day one", "a yearly bonus",
         "free meals on shift", "tuition help"]


def gen_job(r: random.Random) -> Page:
    title, d1, d2, k1, k2 = r.choice(JOBS)
    lo = r.randint(28, 90) * 1000
    slots = dict(title=title, a_title=article(title), d1=d1, d2=d2, k1=k1, k2=k2, company=r.choice(COMPANIES),
                 city=r.choice(CITIES), lo=money(lo), hi=money(lo + r.randint(5, 30) * 1000), perk=r.choice(PERKS),
                 contact=person(r), month=r.choice(MONTHS), day=str(r.randint(1, 28)))
    parts = [
        (1, ["{company} is hiring {a_title} in {city}.", "We are looking for {a_title} to join our team in {city}.",
             "Now hiring: full-time {title}, {city} location."]),
        (1, ["You will {d1} and {d2}.", "In this role you will {d1}."]),
        (0.8, ["The ideal candidate has {k1} and {k2}.", "We need someone with {k1}."]),
        (0.7, ["Pay ranges from {lo} to {hi} a year, plus {perk}.", "Salary starts at {lo}, with {perk}."]),
        (0.5, ["Send your resume to {contact} by {month} {day}.", "Apply online or ask for {contact} in person."]),
    ]
    extras = ["We are an equal opportunity employer.", "Part-time schedules may be possible."]
    swappable = {"day": "day", "contact": "person"}
    return build(r, "job", title, parts, slots, swappable, extras)


HOMES = table("""
brick colonial | a formal dining room | original oak floors | a wood-burning fireplace | a two-car garage
mid-century ranch | walls of glass facing the backyard | a sunken living room | terrazzo floors | a carport
downtown loft | exposed brick and timber beams | fourteen-foot ceilings | a rooftop deck | a building gym
farmhouse on five acres | a wraparound porch | a red barn with power | a fenced pasture | a fruit orchard
lakefront cabin | a private dock | a stone fireplace | a screened porch | a sleeping loft
craftsman bungalow | built-in bookshelves | a deep front porch | a detached studio | leaded glass windows
modern townhouse | an open kitchen with a large island | a private rooftop terrace | smart home controls | an attached garage
Victorian row house | a turret reading nook | restored plaster moldings | a clawfoot tub | a walled garden
starter condo | a galley kitchen with new appliances | in-unit laundry | a balcony | a reserved parking spot
split-level family home | a finished basement with a rec room | a fenced yard with a play set | a new roof | a big deck
adobe house | thick walls that stay cool | a courtyard with a fountain | kiva fireplaces | a desert garden
tiny house on wheels | a sleeping loft with skylights | a composting toilet | solar panels | a fold-down table
""")


def gen_home(r: random.Random) -> Page:
    home, *feats = r.choice(HOMES)
    f1, f2, f3 = r.sample(feats, 3)
    price = r.randint(9, 95) * 10000 + r.choice([0, 5000])
    slots = dict(home=home, f1=f1, f2=f2, f3=f3, beds=str(r.randint(2, 5)), baths=str(r.randint(1, 3)),
                 street=r.choice(STREETS), city=r.choice(CITIES), price=money(price),
                 near=r.choice(["the elementary school", "a bus line", "the river trail", "downtown shops", "a city park"]),
                 weekday=r.choice(["Saturday", "Sunday"]), agent=person(r), sqft=str(r.randint(6, 40) * 100))
    parts = [
        (1, ["Just listed: a {beds}-bedroom {home} on {street} in {city}.",
             "This {home} with {beds} bedrooms and {baths} baths sits on a quiet street in {city}.",
             "Come see this {home} in {city}, with {sqft} square feet of living space."]),
        (1, ["Highlights include {f1} and {f2}.", "You will love {f1} and {f2}."]),
        (0.6, ["There is also {f3}.", "Buyers will appreciate {f3}."]),
        (0.5, ["It is a short walk to {near}.", "The location is close to {near}."]),
        (1, ["Offered at {price}.", "Priced at {price}."]),
        (0.4, ["Open house this {weekday} with agent {agent}.", "Call {agent} for a private showing."]),
    ]
    extras = ["Seller is motivated.", "Taxes and HOA details are available on request."]
    swappable = {"price": "number", "sqft": "number", "street": "street", "agent": "person"}
    return build(r, "home", home, parts, slots, swappable, extras)


REVIEWS = table("""
novel | a retired astronaut who opens a bakery in a small mountain town | warm and funny
novel | two sisters who inherit a failing vineyard and a family secret | quietly devastating
novel | a detective who can only solve crimes in her dreams | wildly inventive
film | a high school chess team that makes it to the national finals | a pure crowd-pleaser
film | a lighthouse keeper who rescues a stranded orca | gorgeously shot
film | a heist planned by residents of a retirement home | a delight from start to finish
album | songs written during a year of sailing alone across the Atlantic | haunting and spare
album | a brass band playing covers of nineties dance hits | ridiculous in the best way
podcast | the history of forgotten inventions and their inventors | endlessly surprising
podcast | a chef traveling to find the origin of famous street foods | mouthwatering
board game | building railroads across a map of the old west | deep but easy to learn
board game | cooperating to stop a spreading wildfire | tense and thrilling
video game | a fox exploring a flooded city to find its family | beautiful and sad
video game | running a tiny farm on a floating island | endlessly relaxing
memoir | growing up above a family laundromat in the eighties | tender and sharp
cookbook | one-pot dinners from thirty different countries | genuinely useful
play | a family reunion that goes very wrong during a snowstorm | hilarious
documentary | the last blacksmiths working in Europe | quietly moving
graphic novel | a girl who befriends the ghost of a medieval knight | charming
poetry collection | the changing seasons on a small Irish farm | luminous
""")

TITLE_A = ["The Salt", "A Winter", "The Long", "Paper", "The Last", "Small", "The Glass", "Northern", "Hidden", "Bright"]
TITLE_B = ["Harbor", "Orchard", "Road", "Lanterns", "Garden", "Machine", "Season", "Hours", "Kingdom", "River"]


def gen_review(r: random.Random) -> Page:
    medium, premise, verdict = r.choice(REVIEWS)
    slots = dict(medium=medium, premise=premise, verdict=verdict, title=f"{r.choice(TITLE_A)} {r.choice(TITLE_B)}",
                 author=person(r), stars=str(r.randint(3, 5)), hours=str(r.randint(2, 40)), reviewer=r.choice(FIRST))
    parts = [
        (1, ["{title} is the new {medium} from {author}, and it is {verdict}.",
             "I finally got to {title}, the {medium} by {author}.",
             "{author}'s {medium} {title} is {verdict}."]),
        (1, ["It is about {premise}.", "The theme: {premise}.", "The premise: {premise}."]),
        (0.6, ["The middle drags a little, but the ending makes up for it.", "I did not expect to be this moved.",
               "Some parts feel rushed, yet it mostly works."]),
        (0.5, ["I would give it {stars} out of five.", "My rating: {stars} stars."]),
        (0.3, ["Review by {reviewer}.", "I spent about {hours} hours with it and regret none of them."]),
    ]
    extras = ["I will be recommending it to friends.", "Your mileage may vary, of course."]
    swappable = {"author": "person", "hours": "number"}
    return build(r, "review", premise, parts, slots, swappable, extras)


PLANTS = table("""
tomatoes | start seeds indoors six weeks before the last frost | stake or cage them early | water deeply at the base | pinch off suckers for bigger fruit
garlic | plant cloves in autumn, pointy end up | mulch heavily with straw | cut off the flower stalks in early summer | harvest when the lower leaves brown
blueberries | give them acidic soil with plenty of peat | plant two varieties for better pollination | net the bushes against birds | prune old canes in late winter
basil | wait until nights stay above fifty degrees | pinch the tops to keep plants bushy | harvest often before it flowers | grow it next to tomatoes
potatoes | plant seed potatoes in a trench | hill soil around the stems as they grow | stop watering when the leaves yellow | dig carefully with a fork
roses | plant them where they get six hours of sun | feed them after every flush of blooms | deadhead spent flowers | watch for black spot on leaves
lavender | plant it in gritty, well-drained soil | water rarely once established | trim it after flowering | never cut into bare wood
strawberries | set the crowns level with the soil | remove runners to focus energy on fruit | mulch to keep berries clean | replace plants every three years
zucchini | sow seeds directly in warm soil | give each plant a lot of room | check daily once they start producing | pick them small for the best flavor
hydrangeas | plant them in morning sun and afternoon shade | water often in hot weather | change bloom color with soil acidity | prune only after flowering
peppers | start seeds indoors on a heat mat | transplant after the soil warms up | feed with a low-nitrogen fertilizer | harvest green or wait for color
sunflowers | sow seeds after the last frost | stake the tall varieties | let the heads dry on the stalk | save seeds for birds in winter
lettuce | sow small batches every two weeks | grow it in partial shade in summer | keep the soil evenly moist | harvest outer leaves as needed
apple trees | plant bare-root trees in early spring | prune to an open center shape | thin fruit to one per cluster | watch for codling moth
peonies | plant the roots shallow in autumn | be patient for the first blooms | support heavy flowers with rings | cut stems back after frost
carrots | sow seeds in loose, stone-free soil | keep the seedbed damp until they sprout | thin seedlings to two inches | cover with mesh against carrot fly
""")


def gen_garden(r: random.Random) -> Page:
    plant, *tips = r.choice(PLANTS)
    t1, t2, t3 = sorted(r.sample(tips, 3), key=tips.index)  # keep the season's order
    slots = dict(plant=plant, t1=t1, t2=t2, t3=t3, zone=str(r.randint(3, 10)),
                 inches=str(r.choice([4, 6, 12, 18, 24, 36])), member=person(r), lbs=str(r.randint(5, 60)),
                 club=f"{r.choice(CITIES)} Garden Club")
    parts = [
        (1, ["Growing {plant} in zone {zone} is easy if you follow a few rules.",
             "Here are our best tips for growing {plant}.",
             "Growing {plant} this year? Keep these pointers in mind."]),
        (1, ["First, {t1}.", "Above all, {t1}."]),
        (1, ["Second, {t2}.", "It also helps to {t2}."]),
        (0.6, ["And finally, {t3}.", "Remember to {t3}."]),
        (0.4, ["Space plants about {inches} inches apart.", "Leave about {inches} inches between plants."]),
        (0.3, ["Member {member} of the {club} harvested {lbs} pounds last season."]),
    ]
    extras = ["Mulch saves a lot of watering.", "Keep notes so you can do even better next year."]
    swappable = {"zone": "number", "inches": "number", "lbs": "number", "member": "person"}
    return build(r, "garden", plant, parts, slots, swappable, extras)


PETS = table("""
cat | scratches the couch | give it a tall, sturdy scratching post right next to the couch | reward it with treats when it uses the post
dog | barks at every passerby | block the view of the street with window film | teach a quiet cue and reward silence
rabbit | chews electrical cords | cover cords with plastic tubing | give it willow sticks and cardboard to chew instead
parrot | plucks its own feathers | rule out illness with an avian vet | add foraging toys and more time out of the cage
hamster | runs on its wheel all night | move the cage out of the bedroom | choose a larger, silent wheel
goldfish | floats upside down after eating | soak its pellets before feeding | offer blanched peas once a week
horse | bites at its belly | watch for signs of colic and call the vet | check the pasture for toxic weeds
guinea pig | stopped eating its hay | check its teeth for overgrowth | offer fresh timothy hay every day
tortoise | will not wake up in spring | check that it is warm enough | see a reptile vet if it stays sleepy
dog | pulls hard on the leash | stop walking whenever the leash goes tight | try a front-clip harness
cat | wakes you at four in the morning for food | use an automatic feeder | play with it hard right before bed
puppy | cries in its crate at night | put the crate next to your bed | cover it with a blanket to make a den
bearded dragon | has stopped basking | check the heat lamp with a thermometer | replace the UV bulb every six months
ferret | smells very strong | clean the bedding every few days | avoid bathing it too often
chickens | peck at each other | give them more space | hang cabbages to keep them busy
senior dog | seems stiff getting up | ask your vet about joint supplements | put rugs on slippery floors
""")


def gen_pet(r: random.Random) -> Page:
    animal, issue, a1, a2 = r.choice(PETS)
    slots = dict(animal=animal, issue=issue, a1=a1, a2=a2, reader=r.choice(FIRST), pet=r.choice(
        ["Biscuit", "Pepper", "Mochi", "Ziggy", "Olive", "Bandit", "Noodle", "Juniper", "Tank", "Pickles"]),
                 city=r.choice(CITIES), weeks=str(r.randint(2, 8)), vet=f"Dr. {r.choice(LAST)}")
    parts = [
        (1, ["If your {animal} {issue}, you are not alone.", "Reader {reader} asks why their {animal}, {pet}, {issue}.",
             "Why does my {animal} keep doing this? It {issue}."]),
        (1, ["The first thing to try is to {a1}.", "Our advice: {a1}."]),
        (1, ["You can also {a2}.", "It also helps to {a2}."]),
        (0.5, ["Most owners see a change within {weeks} weeks.", "Give it {weeks} weeks before you judge."]),
        (0.4, ["{vet} from our clinic in {city} says patience matters most.", "When in doubt, ask {vet} or your own vet."]),
    ]
    extras = ["Every animal is different.", "Never punish your pet for this."]
    swappable = {"reader": "first", "weeks": "number", "vet": "title_last"}
    return build(r, "pet", f"{animal} {issue}", parts, slots, swappable, extras)


EXERCISES = table("""
Swimming | build endurance without stressing your joints | keep your head in line with your spine and exhale underwater | start slowly if you have shoulder problems
Kettlebell swings | strengthen your hips and back | hinge at the hips and let the bell float to chest height | never lift the weight with your arms
Walking | lower blood pressure and improve your mood | swing your arms and take quick, short steps | pick supportive shoes
Squats | build strong legs for daily life | sit back as if into a chair and keep your heels down | stop if your knees hurt
Rowing | train your whole body at once | push with your legs first, then pull with your arms | do not round your lower back
Yoga | improve flexibility and balance | move slowly and breathe through your nose | skip poses that cause pain
Jumping rope | boost your heart health in minutes a day | stay on the balls of your feet and keep jumps small | land softly to protect your shins
Planks | strengthen your core | keep a straight line from head to heels | do not let your hips sag
Cycling | burn calories while exploring | set the saddle so your knee is nearly straight at the bottom | wear a helmet every ride
Push-ups | build upper body strength with no equipment | lower your chest to a fist's height above the floor | start on your knees if needed
Tai chi | improve balance and prevent falls | shift your weight slowly and keep your knees soft | practice on a flat surface
Stair climbing | build leg power and lung capacity | use the rail for balance and keep a steady pace | go easy on the way down
Pilates | strengthen deep core muscles | focus on control rather than speed | tell your instructor about back problems
Dancing | have fun while getting fit | follow the beat and let your arms move | wear shoes with some grip
Rock climbing | build grip strength and problem-solving | keep your arms straight and push with your legs | always check your knots
Deadlifts | strengthen the whole back of your body | keep the bar close to your shins | learn the form with a light weight
""")


def gen_fitness(r: random.Random) -> Page:
    ex, benefit, cue, caution = r.choice(EXERCISES)
    slots = dict(ex=ex, ex_l=ex.lower(), benefit=benefit, cue=cue, caution=caution, sets=str(r.randint(2, 5)),
                 reps=str(r.choice([8, 10, 12, 15, 20])), days=str(r.randint(2, 5)),
                 minutes=str(r.choice([10, 15, 20, 30, 45])),
                 coach=person(r))
    parts = [
        (1, ["{ex} is one of the best ways to {benefit}.", "Want to {benefit}? Try {ex_l}.",
             "{ex} can help you {benefit}."]),
        (1, ["The key is to {cue}.", "For good form, {cue}."]),
        (0.7, ["Aim for {sets} sets of {reps}, {days} times a week.", "Start with {minutes} minutes, {days} days a week."]),
        (0.6, ["Be careful: {caution}.", "One warning: {caution}."]),
        (0.4, ["Coach {coach} says consistency beats intensity.", "Trainer {coach} suggests tracking your progress."]),
    ]
    extras = ["Always warm up first.", "Drink plenty of water."]
    swappable = {"sets": "number", "minutes": "number", "coach": "person"}
    return build(r, "fitness", ex, parts, slots, swappable, extras)


TECH = table("""
printer | says it is offline even though it is connected | turn the printer off and on again | remove it from your computer and add it back
phone | will not charge past eighty percent | turn off optimized battery charging in settings | clean lint out of the charging port with a toothpick
smart TV | buffers constantly while streaming | restart your router and the TV | lower the streaming quality in the app settings
laptop | overheats and the fan is very loud | clean the vents with compressed air | use it on a hard surface, not a bed
email app | stopped syncing new messages | check that you are online and signed in | remove the account and add it again
Bluetooth speaker | will not pair with your phone | forget the device in your phone's Bluetooth list | hold the speaker's power button to reset it
tablet | freezes on the logo at startup | hold the power and volume buttons to force a restart | update it from a computer
wireless mouse | cursor jumps around the screen | replace the batteries | use a mouse pad instead of a glass desk
video calls | have choppy audio | close other apps using the internet | plug in with a network cable
smart watch | loses its connection to your phone | keep Bluetooth on at all times | unpair and pair the watch again
external hard drive | does not show up on your computer | try a different cable and port | check the disk management tool
game console | shows an error when downloading updates | check free storage space | clear the cache by unplugging it for a minute
password manager | will not fill in passwords | enable the browser extension | update the app to the newest version
home security camera | goes offline at night | move the router closer | check that night mode is not draining the battery
""")


def gen_tech(r: random.Random) -> Page:
    device, problem, fix1, fix2 = r.choice(TECH)
    slots = dict(device=device, problem=problem, fix1=fix1, fix2=fix2, ver=f"{r.randint(2, 17)}.{r.randint(0, 9)}",
                 ticket=str(r.randint(10000, 99999)), agent=r.choice(FIRST), minutes=str(r.choice([2, 5, 10])))
    parts = [
        (1, ["If your {device} {problem}, try these steps before contacting support.",
             "Problem: your {device} {problem}.", "Many users report that their {device} {problem}."]),
        (1, ["First, {fix1}.", "Start here: {fix1}."]),
        (1, ["If that fails, {fix2}.", "Next, {fix2}."]),
        (0.5, ["These steps apply to version {ver} and later.", "This article was updated for version {ver}."]),
        (0.4, ["Still stuck? Reply to ticket {ticket} and {agent} will help.", "Most fixes take under {minutes} minutes."]),
    ]
    extras = ["Back up your data before you start.", "Check for software updates first."]
    swappable = {"ver": "number", "ticket": "number", "agent": "first"}
    return build(r, "tech", f"{device} {problem}", parts, slots, swappable, extras)


SPORTS = table("""
basketball | points | hit a go-ahead three-pointer with seconds left | grabbed fifteen rebounds | scored thirty points off the bench
soccer | goals | curled a free kick into the top corner | saved a penalty in the second half | headed home a late corner
baseball | runs | hit a walk-off double in the ninth | struck out eleven batters | stole home in the seventh inning
hockey | goals | scored on a breakaway in overtime | stopped forty shots | had a goal and two assists
volleyball | sets | served six straight aces | recorded twenty kills | blocked the final point
rugby | points | ran in two tries | kicked a long penalty goal | made a try-saving tackle
""")

MASCOTS = ["Hawks", "Miners", "River Cats", "Pioneers", "Thunder", "Foxes", "Rockets", "Lumberjacks", "Sharks", "Comets"]


def gen_sports(r: random.Random) -> Page:
    sport, unit, *plays = r.choice(SPORTS)
    p1, p2 = r.sample(plays, 2)
    hi = {"goals": r.randint(1, 6), "runs": r.randint(2, 12), "sets": 3}.get(unit) or (
        r.randint(70, 120) if sport == "basketball" else r.randint(12, 45))
    lo = r.randint(hi // 2, hi - 1)
    m1, m2 = r.sample(MASCOTS, 2)
    slots = dict(sport=sport, unit=unit, p1=p1, p2=p2, hi=str(hi), lo=str(lo),
                 home=f"{r.choice(CITIES)} {m1}", away=f"{r.choice(CITIES)} {m2}",
                 star=person(r), other=person(r), weekday=r.choice(WEEKDAYS), crowd=f"{r.randint(2, 40):,}00",
                 wins=str(r.randint(3, 20)), losses=str(r.randint(1, 12)))
    parts = [
        (1, ["The {home} beat the {away} {hi}-{lo} in {sport} on {weekday} night.",
             "In {sport}, the {home} held off the {away} {hi}-{lo}."]),
        (1, ["{star} {p1}.", "The difference was {star}, who {p1}."]),
        (0.6, ["Teammate {other} {p2}.", "{other} also {p2}."]),
        (0.5, ["A crowd of {crowd} watched.", "The win lifts the {home} to {wins}-{losses} this season."]),
    ]
    extras = ["The coach praised the team's defense.", "Highlights are online."]
    swappable = {"crowd": "number", "wins": "number", "star": "person", "other": "person"}
    return build(r, "sports", sport, parts, slots, swappable, extras)


SCIENCE = table("""
why the sky is blue | sunlight contains every color mixed together | air molecules scatter short blue wavelengths much more than red ones | at sunset the light crosses more air, so the reds reach us instead
how bees make honey | worker bees collect nectar from flowers | they pass it mouth to mouth and add enzymes | fanning wings evaporate water until the honey thickens
why leaves change color in autumn | shorter days tell trees to stop making chlorophyll | as the green fades, yellow pigments that were there all along show through | reds come from new pigments made in sugary leaves
how lightning forms | ice and water collide inside storm clouds | the collisions separate positive and negative charges | when the difference gets big enough, a giant spark jumps
why the moon has phases | the moon reflects sunlight rather than shining itself | as it orbits Earth we see different amounts of its lit half | a full cycle takes about a month
how vaccines work | they show the immune system a harmless piece of a germ | the body makes antibodies and memory cells | if the real germ shows up later, the defense is ready
why ice floats | water expands when it freezes | the crystal structure leaves more space between molecules | that makes ice less dense than liquid water
how rainbows form | sunlight enters raindrops and bends | each color bends by a slightly different amount | the light reflects off the back of the drop and spreads into a band
why cats purr | the purr comes from quick twitches of muscles in the voice box | cats purr when happy but also when hurt or stressed | some scientists think the vibration helps bones heal
how tides work | the moon's gravity pulls on the oceans | water bulges on the sides facing and opposite the moon | as Earth spins, coasts pass through the bulges twice a day
how volcanoes erupt | rock melts deep underground into magma | gas bubbles make the magma lighter and push it upward | pressure builds until it bursts through the crust
why we yawn | nobody is completely sure | one idea is that yawning cools the brain | yawns are contagious, even between people and dogs
how birds migrate | many birds sense Earth's magnetic field | they also navigate by the sun and stars | some fly thousands of miles without stopping
how bread rises | yeast eats the sugars in flour | it releases carbon dioxide gas | stretchy gluten traps the bubbles and the dough puffs up
why the ocean is salty | rain slowly wears minerals out of rocks | rivers carry the salts to the sea | when seawater evaporates, the salt stays behind
how fireflies glow | a chemical reaction in their tails makes cold light | the light comes from a molecule called luciferin | each species flashes its own pattern to find mates
""")


def gen_science(r: random.Random) -> Page:
    topic, e1, e2, e3 = r.choice(SCIENCE)
    slots = dict(topic=topic, e1=e1, e2=e2, e3=e3, teacher=f"{r.choice(['Ms.', 'Mr.', 'Dr.'])} {r.choice(LAST)}",
                 grade=ordinal(r.randint(3, 9)), city=r.choice(CITIES))
    parts = [
        (1, ["Ever wondered {topic}?", "Here is a simple explanation of {topic}.", "Kids often ask {topic}."]),
        (1, ["To start, {e1}.", "First of all, {e1}."]),
        (1, ["Then {e2}.", "On top of that, {e2}."]),
        (0.7, ["Finally, {e3}.", "And {e3}."]),
        (0.4, ["Thanks to {teacher}'s {grade} grade class in {city} for the question."]),
    ]
    extras = ["Science is full of surprises.", "Try explaining it to a friend."]
    swappable = {"teacher": "title_last", "grade": "ordinal"}
    return build(r, "science", topic, parts, slots, swappable, extras)


COURSES = table("""
watercolor painting | mixing colors | wet-on-wet washes | painting skies | simple landscapes
beginner Spanish | greetings and introductions | ordering food | the present tense | everyday conversation
woodworking | using hand tools safely | cutting joints | finishing with oil | building a small box
creative writing | finding ideas | writing dialogue | building characters | giving feedback
photography | camera settings | composition | natural light | editing on a computer
pottery | centering clay on the wheel | pulling walls | trimming | glazing
personal finance | budgeting | paying off debt | saving for retirement | understanding credit scores
first aid | CPR | treating burns | bandaging wounds | what to do in a choking emergency
coding for beginners | variables and loops | building a web page | debugging | a final project
bread baking | kneading by hand | shaping loaves | sourdough starters | scoring and baking
beekeeping | hive anatomy | inspecting frames | treating for mites | harvesting honey
sign language | the alphabet | common signs | facial grammar | conversation practice
""")


def gen_course(r: random.Random) -> Page:
    subject, *topics = r.choice(COURSES)
    t1, t2, t3 = r.sample(topics, 3)
    slots = dict(subject=subject, t1=t1, t2=t2, t3=t3, season=r.choice(SEASONS), city=r.choice(CITIES),
                 weeks=str(r.randint(4, 12)), teacher=person(r), years=str(r.randint(5, 30)),
                 price=money(r.randint(6, 40) * 10), weekday=r.choice(WEEKDAYS), seats=str(r.randint(6, 20)))
    parts = [
        (1, ["Learn {subject} this {season} at the {city} community center.", "Our {subject} class returns this {season}.",
             "Always wanted to try {subject}? Now is your chance."]),
        (1, ["Over {weeks} weeks you will cover {t1}, {t2} and {t3}.", "Lessons cover {t1} and {t2}."]),
        (0.6, ["The class is taught by {teacher}, who has {years} years of experience.", "Your teacher is {teacher}."]),
        (0.6, ["Tuition is {price}, materials included.", "The cost is {price} for the full course."]),
        (0.4, ["Classes meet every {weekday} evening.", "Only {seats} seats are available."]),
    ]
    extras = ["No experience is needed.", "Sign up at the front desk."]
    swappable = {"weeks": "number", "price": "number", "years": "number", "seats": "number", "teacher": "person"}
    return build(r, "course", subject, parts, slots, swappable, extras)


REASONS = ["We are moving across the country and cannot take it with us.", "I upgraded and no longer use it.",
           "It was a gift and I already had one.", "My kids have outgrown it.", "We are clearing out the garage.",
           "I bought two by mistake.", "Downsizing to a smaller apartment.", "It just does not fit my routine anymore."]
CONDITIONS = ["like new", "in good shape", "lightly used", "barely used", "with a few scratches", "in its original box"]


def gen_forsale(r: random.Random) -> Page:
    # A classified ad for a used item: same items as the product pages, told by a private seller.
    item, use, *feats = r.choice(PRODUCTS)
    slots = dict(item=item, an_item=article(item), brand=r.choice(BRANDS), use=use, f1=r.choice(feats),
                 cond=r.choice(CONDITIONS),
                 age=str(r.randint(2, 8)), reason=r.choice(REASONS), price=money(r.randint(2, 60) * 5),
                 street=r.choice(STREETS), city=r.choice(CITIES), seller=r.choice(FIRST), phone=str(r.randint(1000, 9999)))
    parts = [
        (1, ["Selling my {brand} {item}, {cond}.", "For sale: {an_item}, {age} years old and {cond}.",
             "Moving sale! My {item} needs a new home.", "Used {brand} {item} for sale, {cond}."]),
        (0.7, ["{reason}"]),
        (0.6, ["It still {f1}.", "Great for {use}."]),
        (1, ["Asking {price}, cash only.", "{price} or best offer.", "Yours for {price}."]),
        (0.7, ["Pickup near {street} in {city}.", "Local pickup only, {city} area."]),
        (0.5, ["Text {seller} at 555-{phone}.", "Message {seller} if interested."]),
    ]
    extras = ["No holds, first come first served.", "Smoke-free and pet-free home."]
    swappable = {"age": "number", "price": "number", "phone": "number"}
    return build(r, "forsale", item, parts, slots, swappable, extras)


HOBBIES = ["fly fishing", "growing prize tomatoes", "crossword puzzles", "square dancing", "restoring old radios",
           "baking pies for the church sale", "watching baseball", "birdwatching", "playing the fiddle", "woodcarving",
           "quilting", "long road trips", "playing bridge", "painting landscapes", "tending bees", "sailing",
           "telling terrible jokes", "coaching youth soccer", "collecting stamps", "camping in the mountains",
           "cooking for large crowds", "reading mystery novels", "ballroom dancing", "building model ships"]
SURVIVORS = ["two daughters and five grandchildren", "a loving spouse of forty years", "three sons and a sister",
             "many nieces and nephews", "a brother and two great-grandchildren", "a son, a daughter and a loyal dog"]


def gen_obituary(r: random.Random) -> Page:
    title, *_ = r.choice(JOBS)
    first, last = r.choice(FIRST), r.choice(LAST)
    h1, h2 = r.sample(HOBBIES, 2)
    slots = dict(name=f"{first} {last}", first=first, age=str(r.randint(58, 99)), city=r.choice(CITIES),
                 home=r.choice(CITIES), month=r.choice(MONTHS), day=str(r.randint(1, 28)), a_job=article(title),
                 years=str(r.randint(12, 45)), h1=h1, h2=h2, survivors=r.choice(SURVIVORS), venue=r.choice(VENUES),
                 weekday=r.choice(WEEKDAYS), cause=r.choice(CAUSES))
    parts = [
        (1, ["{name}, {age}, of {city}, died peacefully on {month} {day}.",
             "{name} of {city} passed away on {month} {day} at the age of {age}."]),
        (1, ["Born in {home}, {first} worked for {years} years as {a_job}.", "{first} spent {years} years as {a_job}."]),
        (0.8, ["{first} loved {h1} and {h2}.", "Friends will remember {first} for {h1} and {h2}."]),
        (0.7, ["{first} is survived by {survivors}."]),
        (0.6, ["A memorial service will be held at {venue} on {weekday}."]),
        (0.4, ["In lieu of flowers, the family asks for gifts to the {cause}."]),
    ]
    extras = ["The family thanks the hospice staff for their care.", "All are welcome to attend."]
    swappable = {"age": "number", "day": "day", "years": "number"}
    return build(r, "obituary", title, parts, slots, swappable, extras)


MEETINGS = ["at a pottery class", "on a delayed train", "while volunteering at an animal shelter",
            "in a college chemistry lab",
            "at a friend's barbecue", "on a hiking trip", "through a running club", "at a wedding where both were guests",
            "in line at a coffee shop", "while working at the same summer camp", "at a salsa dancing class",
            "through an online chess game", "at a community garden", "on the first day of law school",
            "during a snowstorm at the airport", "at a music festival", "while rebuilding houses after a flood"]
HONEYMOONS = ["the coast of Portugal", "a cabin in the mountains", "Japan", "a road trip through the desert",
              "the Scottish Highlands", "a Greek island", "a canoe trip in the north woods", "Mexico City"]


def gen_wedding(r: random.Random) -> Page:
    how = r.choice(MEETINGS)
    (t1, *_), (t2, *_) = r.sample(JOBS, 2)
    slots = dict(a=person(r), b=person(r), month=r.choice(MONTHS), day=str(r.randint(1, 28)), venue=r.choice(VENUES),
                 city=r.choice(CITIES), a_job1=article(t1), a_job2=article(t2), company=r.choice(COMPANIES), how=how,
                 home=r.choice(CITIES), trip=r.choice(HONEYMOONS), guests=str(r.randint(30, 250)), officiant=person(r))
    parts = [
        (1, ["{a} and {b} were married on {month} {day} at {venue} in {city}.",
             "{a} and {b} celebrated their wedding on {month} {day} in {city}."]),
        (0.8, ["The couple met {how}.", "They first met {how}."]),
        (0.7, ["{a} works as {a_job1} at {company}, and {b} is {a_job2}."]),
        (0.5, ["{officiant} led the ceremony in front of {guests} guests."]),
        (0.7, ["After a honeymoon in {trip}, they will live in {home}.", "They will honeymoon in {trip}."]),
    ]
    extras = ["Congratulations to the happy couple.", "The reception featured a local band."]
    swappable = {"day": "day", "guests": "number", "officiant": "person"}
    return build(r, "wedding", how, parts, slots, swappable, extras)


# (generator, number of originals, cap on originals per subject). A page shares its
# subject's fixed words, so pages reusing a subject crowd together: genres whose pages are
# mostly fixed text (how-tos, explainers, forum posts) use each subject once, genres full
# of names, places and picks from shared pools may reuse a subject more often.
GENRES = [
    (gen_business, 600, 22), (gen_event, 230, 12), (gen_sports, 200, 40), (gen_job, 170, 9), (gen_home, 120, 10),
    (gen_travel, 150, 10), (gen_product, 160, 4), (gen_forsale, 150, 4), (gen_obituary, 200, 10), (gen_wedding, 160, 10),
    (gen_news, 100, 5), (gen_review, 60, 3), (gen_course, 36, 3), (gen_recipe, 200, 1),
    (gen_howto, 22, 1), (gen_forum, 24, 1), (gen_science, 16, 1), (gen_fitness, 16, 1), (gen_pet, 16, 1),
    (gen_tech, 14, 1), (gen_garden, 16, 1),
]
N_ORIGINALS = sum(n for _, n, _ in GENRES)

# ---------------------------------------------------------------------------------------
# Derived documents.
# ---------------------------------------------------------------------------------------


def redraw(r: random.Random, how: str, old: str) -> str:
    """A new value for a swapped slot, different from the old one and of the same shape."""
    for _ in range(100):
        if how == "number":  # "$1,250" -> "$980", "4" -> "6": similar size, same punctuation
            def repl(m: re.Match) -> str:
                n = int(m.group().replace(",", ""))
                # small counts stay >= 2 so that '3 nights' never becomes '1 nights'
                new = r.randint(max(min(n, 2), n - 2), n + 2) if n < 10 else r.randint(n // 2, 2 * n)
                return f"{new:,}" if "," in m.group() else str(new)

            new = re.sub(r"\d[\d,]*", repl, old, count=1)
        elif how == "ordinal":
            new = ordinal(r.randint(2, 40) if int(old[:-2]) > 9 else r.randint(3, 9))
        elif how == "day":
            new = str(r.randint(1, 28))
        elif how == "year":
            new = str(r.randint(1952, 2019))
        elif how == "person":
            new = person(r)
        elif how == "first":
            new = r.choice(FIRST)
        elif how == "title_last":  # "Dr. Chandler" -> "Dr. Okafor"
            new = f"{old.split()[0]} {r.choice(LAST)}"
        elif how == "street":
            new = r.choice(STREETS)
        elif how == "handle":  # "quietfox12" -> "quietfox407"
            new = re.sub(r"\d+$", str(r.randint(2, 999)), old)
        else:
            raise ValueError(how)
        if new != old:
            return new
    raise RuntimeError(f"could not redraw {how} {old!r}")


def templated(r: random.Random, page: Page) -> str | None:
    """Template spam: the same page with one number, street or name slot swapped everywhere
    it occurs; None when the page happens to use none of its swappable slots."""
    used = [k for k in page.swappable if any("{" + k + "}" in s for s in page.sentences)]
    if len(page.sentences) < 4:
        # In a two- or three-sentence page a person's name is a large share of the meaning:
        # swapping it is no longer "the same page", so short pages only get numbers swapped.
        used = [k for k in used if page.swappable[k] not in ("person", "first", "title_last")]
    if not used:
        return None
    key = r.choice(used)
    slots = dict(page.slots)
    slots[key] = redraw(r, page.swappable[key], slots[key])
    return " ".join(page.render(slots))


# Word and phrase rewrites a paraphrase picks from (matched case-insensitively on word
# boundaries, all in one pass so that a rewrite is never rewritten again).
SYNONYMS = {
    "designed for": "built for", "made for": "intended for", "worth a look": "worth considering",
    "also": "additionally", "favorite": "preferred", "price": "cost", "buy": "purchase",
    "family-owned": "family-run", "known for": "famous for", "specialize in": "focus on",
    "stop by": "drop in", "customers": "clients", "today": "now", "simple": "easy", "easy": "simple",
    "ready": "done", "you will need": "you need", "serve it with": "pair it with", "approve": "back",
    "supporters": "advocates", "critics": "skeptics", "residents": "locals", "expected": "projected",
    "said": "stated", "decision": "vote", "finally": "lastly", "question": "query",
    "advice": "suggestions", "tried": "attempted", "appreciated": "welcome", "join us": "come along",
    "tickets": "passes", "proceeds": "profits", "highlights": "key features", "visitors": "travelers",
    "best": "ideal", "one of the best ways": "among the best ways", "stay": "remain",
    "hiring": "recruiting", "looking for": "seeking", "ideal": "perfect", "resume": "CV",
    "just listed": "new listing", "quiet": "peaceful", "close to": "near", "tips": "pointers",
    "remember": "don't forget", "helps": "is useful", "not alone": "in good company",
    "careful": "cautious", "aim for": "target", "problem": "issue", "contacting": "reaching out to",
    "beat the": "defeated the", "a crowd of": "an audience of", "explanation": "account",
    "wondered": "asked yourself", "learn": "study", "class": "course", "teacher": "instructor",
    "great": "excellent", "small": "little", "big": "large", "help": "assist",
    "many": "lots of",
}
# Whole words only, and not inside hyphenated words ("small-town" stays as it is).
_SYNONYM_RE = re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, SYNONYMS), key=len, reverse=True)) + r")(?![\w-])",
                         re.IGNORECASE)


def reword(r: random.Random, text: str, p: float = 0.6) -> str:
    """Swap each known word for its synonym with probability p, keeping the first letter's case."""
    def repl(m: re.Match) -> str:
        word = m.group()
        if r.random() >= p:
            return word
        alt = SYNONYMS[word.lower()]
        return alt[0].upper() + alt[1:] if word[0].isupper() else alt

    return _SYNONYM_RE.sub(repl, text)


def paraphrase(r: random.Random, page: Page) -> str:
    """Same content in other words: keep the opening sentence, shuffle the rest, drop one
    optional sentence or add a spare one, and swap some words for synonyms."""
    sents = list(zip(page.render(), page.optional))
    head, tail = sents[:1], sents[1:]
    r.shuffle(tail)
    sents = head + tail
    droppable = [i for i, (_, optional) in enumerate(sents) if optional and i > 0]
    if len(sents) >= 5 and droppable and r.random() < 0.5:  # dropping from a short page changes too much
        del sents[r.choice(droppable)]
    else:
        sents.insert(r.randrange(1, len(sents) + 1), (r.choice(page.extras).format_map(page.slots), True))
    return reword(r, " ".join(t for t, _ in sents))


def case_or_space(r: random.Random, text: str) -> str:
    """The same text with only case or whitespace changed."""
    variant = r.choice([str.lower, str.upper, lambda t: t.replace(". ", ".  "), lambda t: t.replace(". ", ".\n", 2)])
    new = variant(text)
    return new if new != text else "  " + text + " \n"  # e.g. no ". " to widen: pad the ends


# ---------------------------------------------------------------------------------------


def make_originals(r: random.Random) -> list[Page]:
    """Every genre's quota of distinct pages, with no subject used more than its cap."""
    pages: list[Page] = []
    seen: set[str] = set()
    for gen, quota, cap in GENRES:
        per_subject: dict[str, int] = {}
        made = 0
        while made < quota:
            page = gen(r)
            text = " ".join(page.render())
            if len(page.sentences) < 2 or text in seen or per_subject.get(page.subject, 0) >= cap:
                continue  # too short, a repeat, or its subject is used up
            per_subject[page.subject] = per_subject.get(page.subject, 0) + 1
            seen.add(text)
            pages.append(page)
            made += 1
    return pages


def make_corpus(seed: int = SEED) -> list[dict]:
    r = random.Random(seed)
    pages = make_originals(r)
    texts = [" ".join(p.render()) for p in pages]
    seen = set(texts)

    # docs: (text, kind, index of source original or None)
    docs: list[tuple[str, str, int | None]] = [(t, "original", None) for t in texts]

    # Templated spam often comes in batches: some sources get 2-3 copies.
    candidates = r.sample(range(len(pages)), len(pages))
    n = 0
    while n < N_TEMPLATED:
        src = candidates.pop()
        for _ in range(min(r.choice([1, 1, 1, 2, 3]), N_TEMPLATED - n)):
            text = templated(r, pages[src])
            if text is None or text in seen:
                continue
            seen.add(text)
            docs.append((text, "templated", src))
            n += 1

    n = 0
    while n < N_PARAPHRASE:
        src = candidates.pop()
        if len(pages[src].sentences) < 3:
            continue  # too short to reorder meaningfully
        text = paraphrase(r, pages[src])
        if text in seen:
            continue
        seen.add(text)
        docs.append((text, "paraphrase", src))
        n += 1

    for i in range(N_EXACT):
        src = candidates.pop()
        text = texts[src] if i < N_EXACT // 2 else case_or_space(r, texts[src])
        docs.append((text, "exact", src))

    # Ids are given after shuffling, so neither id order nor shard reveals the kind.
    order = list(range(len(docs)))
    r.shuffle(order)
    new_id = {old: f"doc-{pos + 1:05d}" for pos, old in enumerate(order)}
    rows = []
    for old in order:
        text, kind, src = docs[old]
        rows.append({"id": new_id[old], "text": text, "kind": kind, "source": None if src is None else new_id[src]})
    return rows


def write_corpus(rows: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // N_SHARDS)
    paths = []
    for s in range(N_SHARDS):
        path = out / f"corpus-{s:03d}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows[s * size:(s + 1) * size]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = ap.parse_args()
    rows = make_corpus()
    paths = write_corpus(rows, args.out)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["kind"]] = counts.get(row["kind"], 0) + 1
    print(f"wrote {len(rows)} documents to {len(paths)} shards in {args.out}: "
          + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
