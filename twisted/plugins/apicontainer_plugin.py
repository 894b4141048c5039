from twisted.application.service import ServiceMaker

apicontainer = ServiceMaker(
    "api-container",
    "apicontainer.tap",
    "Deliver each HTTP write to every configured store, all or nothing.",
    "apicontainer",
)
