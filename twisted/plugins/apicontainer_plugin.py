from twisted.application.service import ServiceMaker

apicontainer = ServiceMaker(
    "api-container",
    "apicontainer.server",
    "Deliver each HTTP write to every configured store, all or nothing.",
    "apicontainer",
)
