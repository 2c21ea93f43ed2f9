"""English-German lexicon and German inflection tables for the synthetic translation task.

Deliberately small (about 250 words) so a small model can learn it, but every entry carries what correct
German needs: noun gender, plural and weak-noun forms, full present-tense conjugation, adjective stems,
and the case each preposition and verb governs. Tags say which words make sense together (who can
read, what can be opened, where one can swim), so generated sentences are meaningful as well as
grammatical. Tables are whitespace-separated text parsed once at import; "_" stands for a space.
"""

from typing import NamedTuple


class Noun(NamedTuple):
    en: str
    en_pl: str | None  # None: a mass noun ("milk"): never plural, never with "a"
    de: str
    gender: str  # m | f | n
    de_pl: str | None
    de_obl: str | None  # weak masculine nouns take -(e)n in accusative/dative singular: "den Jungen"
    tags: frozenset[str]


class Adjective(NamedTuple):
    en: str
    de: str  # predicative form: "Der Hund ist müde."
    stem: str  # attributive stem before endings: "müd" + "e", "teur" + "en"
    tags: frozenset[str]


class Verb(NamedTuple):
    en: str
    en_3sg: str
    de: str  # infinitive, also the 1st and 3rd person plural
    de_1sg: str
    de_2sg: str
    de_3sg: str
    case: str  # case of the object: acc | dat | "-" (intransitive)
    objects: frozenset[str]  # tags an object noun must have (intransitive: the allowed PP frames)
    subjects: frozenset[str]


class Frame(NamedTuple):
    """A prepositional phrase slot: English and German preposition, governed case, allowed nouns."""

    en: str
    de: str
    case: str
    tags: frozenset[str]


class Pronoun(NamedTuple):
    en: str
    en_obj: str
    en_poss: str
    de: str
    de_acc: str
    de_dat: str
    de_poss: str  # ein-word stem: "mein" + ending
    person: str  # 1sg | 2sg | 3sg | 1pl | 3pl


def _rows(table: str) -> list[list[str]]:
    lines = (line.split("#")[0].split() for line in table.strip().splitlines())
    return [[field.replace("_", " ") for field in line] for line in lines if line]


def _opt(field: str) -> str | None:
    return None if field == "-" else field


def _tags(field: str) -> frozenset[str]:
    return frozenset() if field == "-" else frozenset(field.split(","))


# Category tags: P person, A animal, T thing, F food, D drink, V vehicle, L place. The other tags name
# what a verb or frame accepts (read, open, wash, to, thru, ...); nopos: no possessive ("her man" means husband).
# en          en_pl          de            g  de_pl          obl       tags
_NOUNS = """
man           men            Mann          m  Männer         -         P,next,to,nopos
woman         women          Frau          f  Frauen         -         P,next,to,nopos
child         children       Kind          n  Kinder         -         P,next
boy           boys           Junge         m  Jungen         Jungen    P,next
girl          girls          Mädchen       n  Mädchen        -         P,next
teacher       teachers       Lehrer        m  Lehrer         -         P,next,to,about,wait
doctor        doctors        Arzt          m  Ärzte          -         P,to,wait
friend        friends        Freund        m  Freunde        -         P,next,to,wait
student       students       Student       m  Studenten      Studenten P,next
neighbor      neighbors      Nachbar       m  Nachbarn       Nachbarn  P,next,to
father        fathers        Vater         m  Väter          -         P,next,wait
mother        mothers        Mutter        f  Mütter         -         P,next,wait
brother       brothers       Bruder        m  Brüder         -         P,next
sister        sisters        Schwester     f  Schwestern     -         P,next
grandmother   grandmothers   Großmutter    f  Großmütter     -         P,to
farmer        farmers        Bauer         m  Bauern         Bauern    P
cook          cooks          Koch          m  Köche          -         P
family        families       Familie       f  Familien       -         P,work
dog           dogs           Hund          m  Hunde          -         A,next,wash,hear,about
cat           cats           Katze         f  Katzen         -         A,next,about
horse         horses         Pferd         n  Pferde         -         A,next,wash
bird          birds          Vogel         m  Vögel          -         A,catch,hear
mouse         mice           Maus          f  Mäuse          -         A,catch
cow           cows           Kuh           f  Kühe           -         A
rabbit        rabbits        Kaninchen     n  Kaninchen      -         A
duck          ducks          Ente          f  Enten          -         A
book          books          Buch          n  Bücher         -         T,read,write,open,carry,about
letter        letters        Brief         m  Briefe         -         T,read,write,open,carry
newspaper     newspapers     Zeitung       f  Zeitungen      -         T,read,carry
film          films          Film          m  Filme          -         T,about
ball          balls          Ball          m  Bälle          -         T,carry,catch,toy
table         tables         Tisch         m  Tische         -         T,build,wash,at,under,on,next
chair         chairs         Stuhl         m  Stühle         -         T,build,carry,on,under,next
door          doors          Tür           f  Türen          -         T,open,at,next,front,behind
window        windows        Fenster       n  Fenster        -         T,open,wash,at,next
key           keys           Schlüssel     m  Schlüssel      -         T,carry
bag           bags           Tasche        f  Taschen        -         T,open,carry
clock         clocks         Uhr           f  Uhren          -         T,hear
lamp          lamps          Lampe         f  Lampen         -         T,carry
picture       pictures       Bild          n  Bilder         -         T,carry
box           boxes          Kiste         f  Kisten         -         T,open,carry,build
computer      computers      Computer      m  Computer       -         T,about
phone         phones         Telefon       n  Telefone       -         T,hear
jacket        jackets        Jacke         f  Jacken         -         T,wash,carry
hat           hats           Hut           m  Hüte           -         T
cup           cups           Tasse         f  Tassen         -         T,wash,carry
apple         apples         Apfel         m  Äpfel          -         F,fruit,carry
pear          pears          Birne         f  Birnen         -         F,fruit
banana        bananas        Banane        f  Bananen        -         F,fruit
egg           eggs           Ei            n  Eier           -         F,cook
cake          cakes          Kuchen        m  Kuchen         -         F,sweet,carry
bread         -              Brot          n  -              -         F,carry
soup          -              Suppe         f  -              -         F,warm,cook
rice          -              Reis          m  -              -         F,warm,cook
water         -              Wasser        n  -              -         D
milk          -              Milch         f  -              -         D
coffee        -              Kaffee        m  -              -         D,cook
tea           -              Tee           m  -              -         D,cook
juice         -              Saft          m  -              -         D
car           cars           Auto          n  Autos          -         V,wash,vin,next,behind
bus           buses          Bus           m  Busse          -         V,wait,hear
train         trains         Zug           m  Züge           -         V,wait,hear
bike          bikes          Fahrrad       n  Fahrräder      -         V,wash,next
boat          boats          Boot          n  Boote          -         V,build
house         houses         Haus          n  Häuser         -         L,in,live,front,behind,next,build
garden        gardens        Garten        m  Gärten         -         L,in,thru,from
park          parks          Park          m  Parks          -         L,in,thru,to,visit
city          cities         Stadt         f  Städte         -         L,in,live,thru,from,visit,about
village       villages       Dorf          n  Dörfer         -         L,in,live,thru,from,visit
school        schools        Schule        f  Schulen        -         L,in,to,front,behind,visit,about
station       stations       Bahnhof       m  Bahnhöfe       -         L,to,at,front
kitchen       kitchens       Küche         f  Küchen         -         L,in,from
room          rooms          Zimmer        n  Zimmer         -         L,in
forest        forests        Wald          m  Wälder         -         L,in,thru,from
market        markets        Markt         m  Märkte         -         L,to,visit
company       companies      Firma         f  Firmen         -         L,work
lake          lakes          See           m  Seen           -         L,swim,at,to
river         rivers         Fluss         m  Flüsse         -         L,swim,at,to
street        streets        Straße        f  Straßen        -         L,on
tree          trees          Baum          m  Bäume          -         under,next,behind
museum        museums        Museum        n  Museen         -         L,in,to,front,visit
library       libraries      Bibliothek    f  Bibliotheken   -         L,in,to,front,visit
"""

# en          de            stem     tags (nouns it may describe)
_ADJECTIVES = """
big           groß          -        P,A,T,V,L
small         klein         -        P,A,T,V,L,fruit
old           alt           -        P,A,T,V,L
new           neu           -        T,V,L
young         jung          -        P,A
beautiful     schön         -        P,A,T,V,L
red           rot           -        T,V,fruit
blue          blau          -        T,V
green         grün          -        T,V,fruit
black         schwarz       -        T,V,A
white         weiß          -        T,V,A
good          gut           -        P,A,T,F,D,V
fast          schnell       -        A,V
slow          langsam       -        A,V
tired         müde          müd      P,A
friendly      freundlich    -        P,A
happy         glücklich     -        P,A
hungry        hungrig       -        P,A
expensive     teuer         teur     T,V
cheap         billig        -        T,V
hot           heiß          -        D,warm
cold          kalt          -        D,warm
fresh         frisch        -        F,D
sweet         süß           -        fruit,sweet
clean         sauber        -        T,V,L
dirty         schmutzig     -        T,V,L,A
quiet         ruhig         -        P,A,L
dark          dunkel        dunkl    L
"""

# Transitive and ditransitive verbs: the object case and the tags its object must carry.
# en        en_3sg      de           1sg       2sg        3sg       case  objects            subjects
_VERBS = """
see         sees        sehen        sehe      siehst     sieht     acc   P,A,T,V,L,F        P,A
read        reads       lesen        lese      liest      liest     acc   read               P
write       writes      schreiben    schreibe  schreibst  schreibt  acc   write              P
buy         buys        kaufen       kaufe     kaufst     kauft     acc   T,F,D,V,A          P
sell        sells       verkaufen    verkaufe  verkaufst  verkauft  acc   T,F,V,A            P
find        finds       finden       finde     findest    findet    acc   T,A                P,A
need        needs       brauchen     brauche   brauchst   braucht   acc   T,V,F,D            P
have        has         haben        habe      hast       hat       acc   T,A,V              P
like        likes       mögen        mag       magst      mag       acc   P,A,F,D,T          P,A
love        loves       lieben       liebe     liebst     liebt     acc   P,A                P
visit       visits      besuchen     besuche   besuchst   besucht   acc   P,visit            P
eat         eats        essen        esse      isst       isst      acc   F                  P,A
drink       drinks      trinken      trinke    trinkst    trinkt    acc   D                  P,A
open        opens       öffnen       öffne     öffnest    öffnet    acc   open               P
carry       carries     tragen       trage     trägst     trägt     acc   carry              P
wash        washes      waschen      wasche    wäschst    wäscht    acc   wash               P
build       builds      bauen        baue      baust      baut      acc   build              P
hear        hears       hören        höre      hörst      hört      acc   P,hear             P,A
know        knows       kennen       kenne     kennst     kennt     acc   P,visit            P
meet        meets       treffen      treffe    triffst    trifft    acc   P                  P
look_for    looks_for   suchen       suche     suchst     sucht     acc   T,A,P              P,A
catch       catches     fangen       fange     fängst     fängt     acc   catch              P,A
cook        cooks       kochen       koche     kochst     kocht     acc   cook               P
help        helps       helfen       helfe     hilfst     hilft     dat   P                  P
thank       thanks      danken       danke     dankst     dankt     dat   P                  P
follow      follows     folgen       folge     folgst     folgt     dat   P,A                P,A
"""

# Ditransitive verbs: "gives the child a book" -> "gibt dem Kind ein Buch" (dative, then accusative).
_DITRANSITIVE = """
give        gives       geben        gebe      gibst      gibt      acc   carry,F            P
show        shows       zeigen       zeige     zeigst     zeigt     acc   carry,read         P
bring       brings      bringen      bringe    bringst    bringt    acc   carry,F            P
"""

# Intransitive verbs: the "objects" column lists the prepositional frames they take.
_INTRANSITIVE = """
play        plays       spielen      spiele    spielst    spielt    -     with,toy,in,on     P,A
work        works       arbeiten     arbeite   arbeitest  arbeitet  -     in,work,withp      P
sleep       sleeps      schlafen     schlafe   schläfst   schläft   -     in,under,on,vin    P,A
wait        waits       warten       warte     wartest    wartet    -     wait,at,front,vin  P,A
run         runs        laufen       laufe     läufst     läuft     -     thru,into,to       P,A
go          goes        gehen        gehe      gehst      geht      -     to,into,thru       P
sit         sits        sitzen       sitze     sitzt      sitzt     -     on,under,at,next,in,vin  P,A
stand       stands      stehen       stehe     stehst     steht     -     next,front,behind,at     P,A
live        lives       wohnen       wohne     wohnst     wohnt     -     live,bei           P
talk        talks       sprechen     spreche   sprichst   spricht   -     withp,about        P
come        comes       kommen       komme     kommst     kommt     -     from,with          P,A
swim        swims       schwimmen    schwimme  schwimmst  schwimmt  -     swim               P,A
drive       drives      fahren       fahre     fährst     fährt     -     to,thru            P
laugh       laughs      lachen       lache     lachst     lacht     -     -                  P
sing        sings       singen       singe     singst     singt     -     in                 P
"""

# Modals put the main verb's infinitive at the end of the clause: "Das Kind will ein Buch lesen."
# en    en_3sg   de       1sg    2sg      3sg
_MODALS = """
can     can      können   kann   kannst   kann
want    wants    wollen   will   willst   will
must    must     müssen   muss   musst    muss
"""

# name    en             de      case  tags
_FRAMES = """
with      with           mit     dat   P,A
withp     with           mit     dat   P
toy       with           mit     dat   toy
in        in             in      dat   in
into      into           in      acc   in
live      in             in      dat   live
swim      in             in      dat   swim
vin       in             in      dat   vin
to        to             zu      dat   to
thru      through        durch   acc   thru
at        at             an      dat   at
on        on             auf     dat   on
under     under          unter   dat   under
next      next_to        neben   dat   next
front     in_front_of    vor     dat   front
behind    behind         hinter  dat   behind
from      from           aus     dat   from
work      for            für     acc   work
wait      for            auf     acc   wait
about     about          über    acc   about
bei       with           bei     dat   P
"""

# Frames that can say where something is: "Der Hund ist im Garten."
LOCATION_FRAMES = ("in", "vin", "at", "on", "under", "next", "front", "behind")

# en    en_obj  en_poss  de    acc    dat     poss    person
_PRONOUNS = """
I       me      my       ich   mich   mir     mein    1sg
you     you     your     du    dich   dir     dein    2sg
he      him     his      er    ihn    ihm     sein    3sg
she     her     her      sie   sie    ihr     ihr     3sg
we      us      our      wir   uns    uns     unser   1pl
they    them    their    sie   sie    ihnen   ihr     3pl
"""

# Fronted time adverbials force verb-second inversion: "Heute liest der Mann ein Buch."
TIME_ADVERBS = {
    "today": "heute",
    "now": "jetzt",
    "tomorrow": "morgen",
    "every day": "jeden Tag",
    "in the morning": "am Morgen",
    "in the evening": "am Abend",
    "on Sunday": "am Sonntag",
    "on Saturday": "am Samstag",
    "after school": "nach der Schule",
}

# Matrix clauses that send the following "dass" clause verb-final.
MATRIX = {
    "I think": "ich denke",
    "I know": "ich weiß",
    "we know": "wir wissen",
    "she says": "sie sagt",
    "he believes": "er glaubt",
    "they hope": "sie hoffen",
    "the teacher says": "der Lehrer sagt",
}

NUMBERS = {"two": "zwei", "three": "drei", "four": "vier", "five": "fünf"}
SEIN = {"1sg": "bin", "2sg": "bist", "3sg": "ist", "1pl": "sind", "3pl": "sind"}

# German declension. Keys: case, then m | f | n | pl.
DEF = {
    "nom": {"m": "der", "f": "die", "n": "das", "pl": "die"},
    "acc": {"m": "den", "f": "die", "n": "das", "pl": "die"},
    "dat": {"m": "dem", "f": "der", "n": "dem", "pl": "den"},
}
EIN = {  # endings of ein, kein and the possessives (mein, dein, sein, ihr, unser)
    "nom": {"m": "", "f": "e", "n": "", "pl": "e"},
    "acc": {"m": "en", "f": "e", "n": "", "pl": "e"},
    "dat": {"m": "em", "f": "er", "n": "em", "pl": "en"},
}
WEAK = {  # adjective after der/die/das
    "nom": {"m": "e", "f": "e", "n": "e", "pl": "en"},
    "acc": {"m": "en", "f": "e", "n": "e", "pl": "en"},
    "dat": {"m": "en", "f": "en", "n": "en", "pl": "en"},
}
MIXED = {  # adjective after an ein-word
    "nom": {"m": "er", "f": "e", "n": "es", "pl": "en"},
    "acc": {"m": "en", "f": "e", "n": "es", "pl": "en"},
    "dat": {"m": "en", "f": "en", "n": "en", "pl": "en"},
}
STRONG = {  # adjective with no article: bare plurals, mass nouns, after numbers
    "nom": {"m": "er", "f": "e", "n": "es", "pl": "e"},
    "acc": {"m": "en", "f": "e", "n": "es", "pl": "e"},
    "dat": {"m": "em", "f": "er", "n": "em", "pl": "en"},
}
# Preposition + definite article contractions that standard German requires.
CONTRACTIONS = {
    ("in", "dem"): "im",
    ("in", "das"): "ins",
    ("an", "dem"): "am",
    ("zu", "dem"): "zum",
    ("zu", "der"): "zur",
    ("bei", "dem"): "beim",
}

NOUNS = {r[0]: Noun(r[0], _opt(r[1]), r[2], r[3], _opt(r[4]), _opt(r[5]), _tags(r[6])) for r in _rows(_NOUNS)}
ADJECTIVES = {r[0]: Adjective(r[0], r[1], r[1] if r[2] == "-" else r[2], _tags(r[3])) for r in _rows(_ADJECTIVES)}


def _verbs(table: str) -> dict[str, Verb]:
    return {r[0]: Verb(*r[:7], _tags(r[7]), _tags(r[8])) for r in _rows(table)}


VERBS = _verbs(_VERBS)
DITRANSITIVE = _verbs(_DITRANSITIVE)
INTRANSITIVE = _verbs(_INTRANSITIVE)
MODALS = {r[0]: r for r in _rows(_MODALS)}
FRAMES = {r[0]: Frame(r[1], r[2], r[3], _tags(r[4])) for r in _rows(_FRAMES)}
PRONOUNS = {r[0]: Pronoun(*r) for r in _rows(_PRONOUNS)}
